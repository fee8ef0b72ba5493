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
RUN pip install --no-cache-dir . && sts-relay --version

# Configuration comes from the environment (STS_RELAY_<SECTION>_<KEY>), or from a TOML file
# mounted somewhere and named by STS_RELAY_CONFIG. Port 465 (implicit TLS) is served when
# STS_RELAY_LISTEN_TLS_ADDRESSES=0.0.0.0:465 and a certificate and key are configured.
# Docker (20.10 and later) lets an unprivileged user bind ports below 1024 in a container.
ENV PYTHONUNBUFFERED=1 \
    STS_RELAY_STATE_PATH=/var/lib/sts-relay \
    STS_RELAY_LISTEN_ADDRESSES=0.0.0.0:25,0.0.0.0:587 \
    STS_RELAY_METRICS_ADDRESS=0.0.0.0:9025
VOLUME ["/var/lib/sts-relay"]
EXPOSE 25 587 465 9025
USER 10025:10025

# No curl in the slim image: Python's urllib asks /healthz on the metrics port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('STS_RELAY_METRICS_ADDRESS', ':9025').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# SIGTERM: stop accepting, finish deliveries in flight within delivery.shutdown_grace (30 s),
# keep the rest queued on the volume. Give `docker stop` more than that (compose does).
STOPSIGNAL SIGTERM
CMD ["sts-relay", "serve"]
