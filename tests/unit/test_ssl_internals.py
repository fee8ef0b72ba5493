"""CPython internals pinned: what relay/delivery/dane.py reads inside `ssl` to see the
certificate chain a server sent (Python 3.11 has no public call for it; 3.13 adds
`SSLObject.get_unverified_chain()`, which dane.peer_chain prefers when present).

- `SSLObject._sslobj.get_unverified_chain()`: a list of `_ssl.Certificate`, leaf first,
  as sent, whatever the verification mode;
- `_ssl.Certificate.public_bytes(_ssl.ENCODING_DER)`: its DER.
Checked over a real loopback TLS connection with an unverified client context, as delivery
makes it under DANE.
"""

from __future__ import annotations

import asyncio
import ssl

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from policy.webpki import unverified_context
from relay.delivery.dane import peer_chain


async def test_the_chain_the_server_sent_is_readable_on_an_unverified_connection() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mx1.d.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server_ctx)
    server_ctx.load_verify_locations(cadata=ca.cert_pem.bytes().decode())

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=unverified_context(), server_hostname="mx1.d.test"
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        if not hasattr(ssl_object, "get_unverified_chain"):  # Python < 3.13: the private call
            inner = ssl_object._sslobj  # type: ignore[attr-defined]
            raw = inner.get_unverified_chain()
            assert isinstance(raw, list)
            assert type(raw[0]).__module__ == "_ssl"
            der = raw[0].public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            assert der == ssl_object.getpeercert(binary_form=True)
        chain = peer_chain(ssl_object)
        expected = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        assert chain[0] == expected.public_bytes(serialization.Encoding.DER)
        # The server completed its chain from its CA store: the CA comes second (what
        # DANE-TA matches against).
        issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        assert chain[1:] == (issuer.public_bytes(serialization.Encoding.DER),)
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
