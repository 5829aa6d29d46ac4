"""Renders and lints charts/camelid with a real Helm v4 engine (PyPI helm-python-sdk), offline.

Prints JSON: {"lint": [...findings...], "renders": {case: {template path: YAML}}, "crds": [file names]} for the
default values and the variants operator/tests/chart.rs checks.
"""

import json
import sys
from pathlib import Path

import helm_python as helm

CHART = Path(__file__).resolve().parents[2] / "charts" / "camelid"

CASES = {
    "default": {},
    "ha": {"replicaCount": 2, "leaderElection": True, "imagePullSecrets": [{"name": "regcred"}],
           "nodeSelector": {"pool": "system"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}]},
    "no-leader-election": {"leaderElection": False, "gpuPrices": {"nvidia-t4": {"spot": 0.11, "onDemand": 0.35}}},
    "no-gateway": {"gateway": {"enabled": False}},
    "open-gateway": {"gateway": {"allowAnonymous": True, "keysSecret": "", "watchNamespace": "team-a"}},
}


def main():
    out = {"lint": helm.lint(str(CHART)), "renders": {}}
    with helm.Chart.load(str(CHART)) as chart:
        out["name"], out["version"] = chart.name, chart.version
        out["crds"] = [c.get("name") or c.get("Name") for c in chart.crds]
        for case, values in CASES.items():
            out["renders"][case] = chart.render(values, name="camelid", namespace="camelid-system")
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
