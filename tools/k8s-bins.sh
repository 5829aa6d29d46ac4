#!/usr/bin/env bash
# Builds the real Kubernetes tools that camelid's cluster tests run against, from their source modules on the Go
# module proxy: kube-apiserver, kube-controller-manager, kube-scheduler and kubectl (one k8s.io/kubernetes build, so
# shared packages compile once), etcd, kwok and helm. Every version is pinned by the go.mod and go.sum beside this
# script (tools/{k8s,etcd,kwok,helm}); nothing is downloaded at test time and no release binary is fetched.
#
# The binaries go into a cache directory outside the repository whose name carries every pinned version and the Go
# version, so a pin bump builds afresh and an unchanged one is skipped. A `.ok` stamp is written last: a killed build
# is redone, never half-used.
#
#   tools/k8s-bins.sh              build what is missing, then print the directory
#   tools/k8s-bins.sh --print-dir  print the directory only (the test harness uses this to find the binaries)
#
# CAMELID_K8S_CACHE overrides the cache root (default: $XDG_CACHE_HOME or ~/.cache, then camelid/k8s-bins).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

# The version a tool module pins, read from its own go.mod (the one place versions are written).
pinned() { sed -n "s|^[[:space:]]*$2 \(v[^ ]*\).*|\1|p" "$here/$1/go.mod" | head -1; }

K8S=$(pinned k8s k8s.io/kubernetes)
ETCD=$(pinned etcd go.etcd.io/etcd/server/v3)
KWOK=$(pinned kwok sigs.k8s.io/kwok)
HELM=$(pinned helm helm.sh/helm/v3)
GOV=$(go env GOVERSION)
for v in K8S ETCD KWOK HELM; do
	[ -n "${!v}" ] || { echo "k8s-bins: no $v version pinned in $here/*/go.mod" >&2; exit 1; }
done
root="${CAMELID_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/camelid/k8s-bins}"
bin="$root/k$K8S-etcd$ETCD-kwok$KWOK-helm$HELM-$GOV"

if [ "${1:-}" = --print-dir ]; then echo "$bin"; exit 0; fi
if [ -f "$bin/.ok" ]; then echo "$bin"; exit 0; fi

mkdir -p "$bin"
rm -f "$bin/.ok"
log() { echo "k8s-bins: $*" >&2; }
timed() { local t0=$SECONDS; "$@"; log "  ${SECONDS}s later: done"; }
build() { (cd "$here/$1" && shift && go build -trimpath "$@"); }

minor=$(echo "$K8S" | cut -d. -f2)
v="-X k8s.io/component-base/version"
c="-X k8s.io/client-go/pkg/version"
stamp="-s -w $v.gitVersion=$K8S $v.gitMajor=1 $v.gitMinor=$minor $v.gitTreeState=clean"
stamp="$stamp $c.gitVersion=$K8S $c.gitMajor=1 $c.gitMinor=$minor $c.gitTreeState=clean"

log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $K8S into $bin"
timed build k8s -ldflags "$stamp" -o "$bin/" k8s.io/kubernetes/cmd/kube-apiserver \
	k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
log "building etcd $ETCD"
timed build etcd -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
log "building kwok $KWOK"
timed build kwok -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK" -o "$bin/kwok" sigs.k8s.io/kwok/cmd/kwok
log "building helm $HELM"
timed build helm -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM" -o "$bin/helm" helm.sh/helm/v3/cmd/helm

"$bin/kube-apiserver" --version | grep -q "$K8S" || { log "kube-apiserver --version does not say $K8S"; exit 1; }
touch "$bin/.ok"
echo "$bin"
