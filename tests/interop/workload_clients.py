"""Drives a Sigil Workload API socket with clients not built on tonic or h2.

usage: workload_clients.py py-spiffe SOCKET SPIFFE_ID  py-spiffe, every Workload API call
       workload_clients.py grpcio SOCKET SPIFFE_ID     plain grpcio, every RPC and error case
       workload_clients.py denied SOCKET               the caller has no identity
       workload_clients.py admin SOCKET TRUST_DOMAIN   plain grpcio on the admin socket
       workload_clients.py certs FILE...               PEM files Sigil wrote: strict parse, LF
       workload_clients.py server-cert HOST:PORT       the certificate the node API presents
       workload_clients.py sds SOCKET SPIFFE_ID        Envoy SDS v3 with grpcio and xds-protos
       workload_clients.py envoy-config FILE...        Envoy bootstraps parsed against Envoy's protos

(py-spiffe registers its own copy of the Workload API messages, so the
py-spiffe and grpcio checks run in separate processes.)

py-spiffe and grpcio (grpc-core) send the percent-encoded socket path as the
HTTP/2 :authority; nothing here overrides it. Certificates are parsed by
Python `cryptography`, which refuses non-DER encodings. Prints one line per
check and exits non-zero on the first failure.
"""

import json
import os
import ssl
import sys
import tempfile
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok: {what}")


def compile_protos(*names):
    """Generates Python stubs for Sigil's own .proto files into a temp dir."""
    out = tempfile.mkdtemp(prefix="sigil-pb-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + list(names)) != 0:
        raise SystemExit(f"FAIL: protoc {names}")
    sys.path.insert(0, out)


def strict_leaf(der, spiffe_id):
    """Parses an X509-SVID leaf strictly and checks the X509-SVID rules."""
    cert = x509.load_der_x509_certificate(der)
    exts = {e.oid.dotted_string: e for e in cert.extensions}  # parses every extension
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    check(bc.critical and not bc.value.ca, "leaf basicConstraints critical, cA false (strict DER)")
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    check(ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign, "leaf keyUsage digitalSignature only")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    check(ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku, "leaf EKU serverAuth+clientAuth")
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    check(uris == [spiffe_id], f"exactly one URI SAN {spiffe_id}")
    check("2.5.29.35" in exts, "leaf has an authorityKeyIdentifier")
    return cert


def strict_ca(der):
    cert = x509.load_der_x509_certificate(der)
    list(cert.extensions)
    check(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca, "bundle certificate is a CA")
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    check(ku.key_cert_sign and ku.crl_sign and not ku.digital_signature, "CA keyUsage keyCertSign+cRLSign only")
    return cert


def der_certs(blob):
    """Splits concatenated DER certificates."""
    certs = []
    while blob:
        # SEQUENCE with a long-form length (certificates are > 127 bytes).
        n = blob[1] & 0x7F
        length = int.from_bytes(blob[2 : 2 + n], "big") + 2 + n
        certs.append(blob[:length])
        blob = blob[length:]
    return certs


def py_spiffe(socket, spiffe_id):
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(socket_path=f"unix://{socket}") as client:
        svid = client.fetch_x509_svid()
        check(str(svid.spiffe_id) == spiffe_id, f"py-spiffe fetch_x509_svid: {svid.spiffe_id}")
        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        check(bundle is not None and bundle.x509_authorities, "py-spiffe fetch_x509_bundles has our trust domain")
        issuers = [a for a in bundle.x509_authorities if a.subject == svid.leaf.issuer]
        check(issuers, "py-spiffe: the SVID's issuer is in the bundle")
        svid.leaf.verify_directly_issued_by(issuers[0])
        check(True, "py-spiffe: the SVID chains to the bundle (signature verified)")
        jwt = client.fetch_jwt_svid(audience={"interop"})
        check(str(jwt.spiffe_id) == spiffe_id, "py-spiffe fetch_jwt_svid")
        jwt_bundles = client.fetch_jwt_bundles()
        check(jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None, "py-spiffe fetch_jwt_bundles")
        validated = client.validate_jwt_svid(jwt.token, "interop")
        check(str(validated.spiffe_id) == spiffe_id, "py-spiffe validate_jwt_svid")
        # Offline validation against the JWT bundle, as a library user would.
        from spiffe import JwtSvid

        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        parsed = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"interop"})
        check(str(parsed.spiffe_id) == spiffe_id, "py-spiffe JwtSvid.parse_and_validate with the JWT bundle")


def stub(socket):
    compile_protos("workload.proto")
    import workload_pb2 as pb
    import workload_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"unix:{socket}")  # no authority override
    return pb, pb_grpc.SpiffeWorkloadAPIStub(channel)


HEADER = (("workload.spiffe.io", "true"),)


def grpcio_allowed(socket, spiffe_id):
    pb, api = stub(socket)
    td = "spiffe://" + spiffe_id.split("/")[2]
    first = next(api.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=20))
    check(first.svids and first.svids[0].spiffe_id == spiffe_id, "grpcio FetchX509SVID: default SVID first")
    chain = der_certs(first.svids[0].x509_svid)
    leaf = strict_leaf(chain[0], spiffe_id)
    cas = [strict_ca(d) for d in der_certs(first.svids[0].bundle)]
    issuer = [c for c in cas if c.subject == leaf.issuer]
    check(issuer, "the leaf's issuer is in the SVID's bundle")
    leaf.verify_directly_issued_by(issuer[0])
    check(leaf.not_valid_after_utc <= issuer[0].not_valid_after_utc, "leaf NotAfter within the CA's")
    check(len(first.svids[0].x509_svid_key) > 0, "PKCS#8 key present")
    hints = [s.hint for s in first.svids if s.hint]
    check(len(hints) == len(set(hints)), "X509-SVID hints unique")

    bundles = next(api.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER, timeout=20))
    check(td in bundles.bundles, f"grpcio FetchX509Bundles keyed by {td}")
    for d in der_certs(bundles.bundles[td]):
        strict_ca(d)

    jwt = api.FetchJWTSVID(pb.JWTSVIDRequest(audience=["interop"]), metadata=HEADER, timeout=20)
    check(jwt.svids and jwt.svids[0].spiffe_id == spiffe_id, "grpcio FetchJWTSVID")
    hints = [s.hint for s in jwt.svids if s.hint]
    check(len(hints) == len(set(hints)), "JWT-SVID hints unique")

    jwks = next(api.FetchJWTBundles(pb.JWTBundlesRequest(), metadata=HEADER, timeout=20))
    keys = json.loads(jwks.bundles[td])["keys"]
    check(keys and all(k.get("kid") for k in keys), "grpcio FetchJWTBundles: a JWKS with kids")

    v = api.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="interop", svid=jwt.svids[0].svid), metadata=HEADER, timeout=20)
    check(v.spiffe_id == spiffe_id and v.claims.fields["sub"].string_value == spiffe_id, "grpcio ValidateJWTSVID with claims")

    expect_code(lambda: api.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="other", svid=jwt.svids[0].svid), metadata=HEADER, timeout=20),
                grpc.StatusCode.INVALID_ARGUMENT, "ValidateJWTSVID with the wrong audience")
    expect_code(lambda: next(api.FetchX509SVID(pb.X509SVIDRequest(), timeout=20)),
                grpc.StatusCode.INVALID_ARGUMENT, "FetchX509SVID without the workload.spiffe.io header")
    expect_code(lambda: api.FetchJWTSVID(pb.JWTSVIDRequest(audience=["x"]), timeout=20),
                grpc.StatusCode.INVALID_ARGUMENT, "FetchJWTSVID without the header")
    expect_code(lambda: next(api.FetchWITSVID(pb.WITSVIDRequest(), metadata=HEADER, timeout=20)),
                grpc.StatusCode.UNIMPLEMENTED, "FetchWITSVID")
    expect_code(lambda: next(api.FetchWITBundles(pb.WITBundlesRequest(), metadata=HEADER, timeout=20)),
                grpc.StatusCode.UNIMPLEMENTED, "FetchWITBundles")


def expect_code(call, code, what):
    try:
        call()
    except grpc.RpcError as e:
        check(e.code() == code, f"{what} -> {code.name} (got {e.code().name}: {e.details()})")
        return
    raise SystemExit(f"FAIL: {what} succeeded, expected {code.name}")


def grpcio_denied(socket):
    pb, api = stub(socket)
    # The registration was just removed: wait for the agent to sync it.
    deadline = time.time() + 30
    while True:
        try:
            next(api.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=20))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                break
            raise SystemExit(f"FAIL: FetchX509SVID -> {e.code().name}, expected PERMISSION_DENIED")
        if time.time() > deadline:
            raise SystemExit("FAIL: FetchX509SVID still answers 30 s after the entry was deleted")
        time.sleep(0.1)
    check(True, "grpcio FetchX509SVID with no identity -> PERMISSION_DENIED")
    expect_code(lambda: api.FetchJWTSVID(pb.JWTSVIDRequest(audience=["x"]), metadata=HEADER, timeout=20),
                grpc.StatusCode.PERMISSION_DENIED, "FetchJWTSVID with no identity")
    expect_code(lambda: next(api.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER, timeout=20)),
                grpc.StatusCode.PERMISSION_DENIED, "FetchX509Bundles with no identity")
    expect_code(lambda: next(api.FetchJWTBundles(pb.JWTBundlesRequest(), metadata=HEADER, timeout=20)),
                grpc.StatusCode.PERMISSION_DENIED, "FetchJWTBundles with no identity")


def grpcio_admin(socket, trust_domain):
    compile_protos("sigil/node/v1/node.proto", "sigil/admin/v1/admin.proto")
    from sigil.admin.v1 import admin_pb2 as pb, admin_pb2_grpc as pb_grpc

    admin = pb_grpc.AdminStub(grpc.insecure_channel(f"unix:{socket}"))
    health = admin.Health(pb.HealthRequest(), timeout=20)
    check(health.trust_domain == trust_domain, "grpcio on the admin socket: Health")
    entries = admin.ListEntries(pb.ListEntriesRequest(), timeout=20)
    check(entries is not None, f"grpcio on the admin socket: ListEntries ({len(entries.entries)} entries)")


def pem_files(paths):
    """Every certificate in PEM files Sigil wrote, parsed strictly."""
    for path in paths:
        data = open(path, "rb").read()
        check(b"\r" not in data, f"{os.path.basename(path)}: LF line endings")
        if b"PRIVATE KEY" in data:
            continue
        for cert in x509.load_pem_x509_certificates(data):
            strict_any(cert.public_bytes(serialization.Encoding.DER), os.path.basename(path))


def strict_any(der, what):
    cert = x509.load_der_x509_certificate(der)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if bc.ca:
        strict_ca(der)
    else:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        strict_leaf(der, uris[0] if uris else "<none>")
    check(True, f"{what}: {cert.subject.rfc4514_string() or '(empty subject)'} parsed strictly")


def server_cert(addr):
    host, port = addr.rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port)), timeout=20)
    strict_any(x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER), "node API TLS certificate")


def sds(socket, spiffe_id):
    """Envoy's SDS protocol with Envoy's own generated messages (xds-protos)."""
    import queue

    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc
    from envoy.type.v3 import semantic_version_pb2

    secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    node = base_pb2.Node(
        id="python-sidecar",
        cluster="api",
        user_agent_name="envoy",
        user_agent_build_version=base_pb2.BuildVersion(
            version=semantic_version_pb2.SemanticVersion(major_number=1, minor_number=30)
        ),
    )
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(grpc.insecure_channel(f"unix:{socket}"))

    def decode(resp):
        out = {}
        for any_msg in resp.resources:
            check(any_msg.type_url == secret_type, "resource type is Secret")
            secret = secret_pb2.Secret()
            any_msg.Unpack(secret)
            out[secret.name] = secret
        return out

    requests = queue.Queue()

    def feed():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    requests.put(discovery_pb2.DiscoveryRequest(node=node, type_url=secret_type, resource_names=["default", "ALL"]))
    responses = stub.StreamSecrets(feed(), timeout=60)
    first = next(responses)
    secrets = decode(first)
    check(sorted(secrets) == ["ALL", "default"], "StreamSecrets: default and ALL")
    tls = secrets["default"].tls_certificate
    chain = tls.certificate_chain.inline_bytes
    check(b"\r" not in chain, "certificate chain PEM has LF line endings")
    leaf = x509.load_pem_x509_certificates(chain)[0]
    strict_leaf(leaf.public_bytes(serialization.Encoding.DER), spiffe_id)
    key = serialization.load_pem_private_key(tls.private_key.inline_bytes, password=None)
    check(
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        == leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "the private key matches the certificate",
    )
    validator = secrets["ALL"].validation_context.custom_validator_config
    check(validator.name == "envoy.tls.cert_validator.spiffe", "ALL is a SPIFFE validator config")
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    validator.typed_config.Unpack(config)
    domains = {td.name: td.trust_bundle.inline_bytes for td in config.trust_domains}
    check(list(domains) == [spiffe_id.split("/")[2]], "ALL holds the workload's trust domain")
    roots = x509.load_pem_x509_certificates(domains[spiffe_id.split("/")[2]])
    check(any(leaf.verify_directly_issued_by(r) is None for r in roots), "the certificate chains to the ALL bundle")
    # ACK, then ask for ROOTCA too: a new response with a new nonce.
    requests.put(
        discovery_pb2.DiscoveryRequest(
            type_url=secret_type,
            version_info=first.version_info,
            response_nonce=first.nonce,
            resource_names=["default", "ALL", "ROOTCA"],
        )
    )
    second = next(responses)
    check(sorted(decode(second)) == ["ALL", "ROOTCA", "default"], "a change of names is answered")
    check(second.nonce != first.nonce and second.version_info != first.version_info, "new nonce and version")
    requests.put(None)

    fetched = stub.FetchSecrets(
        discovery_pb2.DiscoveryRequest(node=node, type_url=secret_type, resource_names=["ROOTCA"]), timeout=20
    )
    check(list(decode(fetched)) == ["ROOTCA"], "FetchSecrets: ROOTCA")

    delta_requests = queue.Queue()

    def delta_feed():
        while True:
            item = delta_requests.get()
            if item is None:
                return
            yield item

    delta_requests.put(
        discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=secret_type, resource_names_subscribe=["default"])
    )
    delta = next(stub.DeltaSecrets(delta_feed(), timeout=60))
    check([r.name for r in delta.resources] == ["default"] and delta.resources[0].version, "DeltaSecrets: default, versioned")
    delta_requests.put(None)


def envoy_config(paths):
    """Parses Envoy bootstrap YAML strictly against Envoy's own protos
    (xds-protos): unknown fields, wrong types and unknown @types fail."""
    import yaml
    from google.protobuf import json_format

    from envoy.config.bootstrap.v3 import bootstrap_pb2

    # The typed_config types the examples use (registering them for Any).
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

    for path in paths:
        with open(path) as f:
            doc = yaml.safe_load(f)
        bootstrap = json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())
        check(True, f"{path}: a valid Envoy v3 bootstrap")
        clusters = {c.name: c for c in bootstrap.static_resources.clusters}
        text = json_format.MessageToJson(bootstrap.static_resources)
        refs = set()
        for key in ("clusterName", "cluster"):
            refs.update(v for k, v in _walk(json.loads(text)) if k == key and isinstance(v, str))
        missing = refs - set(clusters)
        check(not missing, f"{path}: every referenced cluster is defined ({sorted(refs)})")
        sds = clusters.get("sigil_sds")
        check(sds is not None, f"{path}: a sigil_sds cluster")
        pipe = sds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path
        check(pipe == "/tmp/sigil-agent/public/api.sock", f"{path}: SDS over the agent's default socket")
        names = {v for k, v in _walk(json.loads(text)) if k == "name" and isinstance(v, str)}
        secrets = [
            v
            for k, v in _walk(json.loads(text))
            if k in ("tlsCertificateSdsSecretConfigs", "validationContextSdsSecretConfig")
        ]
        secret_names = set()
        for s in secrets:
            for item in s if isinstance(s, list) else [s]:
                secret_names.add(item["name"])
        ok_names = all(n in ("default", "ROOTCA", "ALL") or n.startswith("spiffe://") for n in secret_names)
        check(secret_names and ok_names and names, f"{path}: SDS names Sigil serves ({sorted(secret_names)})")


def _walk(value):
    """Every (key, value) pair in a JSON document, depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "py-spiffe":
        py_spiffe(args[0], args[1])
    elif mode == "grpcio":
        grpcio_allowed(args[0], args[1])
    elif mode == "denied":
        grpcio_denied(args[0])
    elif mode == "admin":
        grpcio_admin(args[0], args[1])
    elif mode == "certs":
        pem_files(args)
    elif mode == "server-cert":
        server_cert(args[0])
    elif mode == "sds":
        sds(args[0], args[1])
    elif mode == "envoy-config":
        envoy_config(args)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("all checks passed")


if __name__ == "__main__":
    main()
