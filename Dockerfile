FROM python:3.11-slim

RUN useradd --system --home-dir /var/lib/sts-relay --create-home sts-relay
WORKDIR /opt/sts-relay
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY policy ./policy
COPY mailqueue ./mailqueue
RUN pip install --no-cache-dir .

USER sts-relay
ENV STS_RELAY_STATE_PATH=/var/lib/sts-relay \
    STS_RELAY_LISTEN_ADDRESSES=0.0.0.0:2525
VOLUME ["/var/lib/sts-relay"]
EXPOSE 2525
CMD ["sts-relay", "serve"]
