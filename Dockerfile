# sts-relay: an outbound SMTP relay that enforces MTA-STS. See README "Docker".
FROM python:3.11-slim

# A fixed numeric uid/gid, so the state volume's owner is the same on every host.
RUN groupadd --system --gid 10025 sts-relay \
    && useradd --system --uid 10025 --gid 10025 --home-dir /var/lib/sts-relay \
        --create-home --shell /usr/sbin/nologin sts-relay

WORKDIR /opt/sts-relay
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY policy ./policy
COPY mailqueue ./mailqueue
COPY tlsrpt ./tlsrpt
COPY posture ./posture
RUN pip install --no-cache-dir . && sts-relay --version

# Configuration, lowest precedence first (README "Docker"): the image's defaults,
# /etc/sts-relay/defaults.toml (listen on 0.0.0.0:25 and :587, state on the volume, metrics
# on 0.0.0.0:9025); your file, /etc/sts-relay/relay.toml (shipped empty: mount yours over it,
# or point STS_RELAY_CONFIG elsewhere); then STS_RELAY_<SECTION>_<KEY> variables. The image
# sets no STS_RELAY_<SECTION>_<KEY> itself, so nothing it ships overrides your file.
# Port 465 (implicit TLS) is served when listen.tls_addresses = ["0.0.0.0:465"] and a
# certificate and key are configured. Docker (20.10 and later) lets an unprivileged user bind
# ports below 1024 in a container.
COPY docker/defaults.toml docker/relay.toml /etc/sts-relay/
ENV PYTHONUNBUFFERED=1 \
    STS_RELAY_DEFAULTS=/etc/sts-relay/defaults.toml \
    STS_RELAY_CONFIG=/etc/sts-relay/relay.toml
VOLUME ["/var/lib/sts-relay"]
EXPOSE 25 587 465 9025
USER 10025:10025

# `sts-relay health` reads the configuration as serve does: it asks /readyz wherever
# metrics.address is set (defaults, file or environment), or, with metrics off, checks that
# the SMTP listener greets. Unhealthy while the listener or the store cannot take mail.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["sts-relay", "health"]

# SIGTERM: stop accepting, finish deliveries in flight within delivery.shutdown_grace (30 s),
# keep the rest queued on the volume. Give `docker stop` more than that (compose does).
STOPSIGNAL SIGTERM
CMD ["sts-relay", "serve"]
