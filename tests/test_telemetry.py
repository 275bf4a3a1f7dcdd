"""Axolotl's telemetry once the plugin is loaded by Axolotl's own config loading.

Axolotl makes its TelemetryManager when `axolotl.cli.config` is imported and sends
`config-loaded` (with `system-info`) before any plugin loads; from the plugin's
`register` on, nothing more may be sent: no error report when a run then fails.
Run in a child process: the manager is a process-wide singleton, and this test
suite opts out of telemetry for every other test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import offline_subprocess_env

PLUGIN = "axolotl_prefalign.PrefAlignPlugin"

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import posthog
    sent = []
    posthog.capture = lambda *a, **kw: sent.append(kw.get("event"))  # no network
    from axolotl.cli.config import load_cfg
    from axolotl.telemetry.manager import TelemetryManager
    before, error = TelemetryManager.get_instance().enabled, None
    try:
        load_cfg(sys.argv[1])
    except Exception as err:
        error = type(err).__name__
    after = TelemetryManager.get_instance().enabled
    print(json.dumps({"before": before, "after": after, "sent": sent, "error": error}))
    """
)


def _run(tmp_path, **env_change: str | None) -> dict:
    data = tmp_path / "pairs.jsonl"
    # cp1252 bytes: the plugin's pre-check (in `register`) fails the run.
    data.write_bytes('{"prompt": "café", "chosen": "a"}\n'.encode("cp1252"))
    cfg = {
        "base_model": "unused",
        "plugins": [PLUGIN],
        "datasets": [{"path": str(data), "type": "axolotl_prefalign.contrast"}],
    }
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "load.py"
    script.write_text(_SCRIPT)
    env = offline_subprocess_env()
    for key in ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK"):
        env.pop(key, None)
    env.update({k: v for k, v in env_change.items() if v is not None})
    proc = subprocess.run(
        [sys.executable, str(script), str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_after_the_plugin_loads_axolotl_sends_no_error_report(tmp_path):
    out = _run(tmp_path)
    assert out["before"] is True  # Axolotl's default: on
    assert out["error"] == "DataFileError"  # the plugin's pre-check failed the run
    assert out["after"] is False
    # Only what Axolotl sent before any plugin could load; no `...-error` report.
    assert out["sent"] == ["config-loaded", "system-info"]


@pytest.mark.slow  # a second child process importing Axolotl (~20 s)
def test_a_users_own_telemetry_choice_is_kept(tmp_path):
    out = _run(tmp_path, AXOLOTL_DO_NOT_TRACK="0")
    assert out["after"] is True
    assert any(event.endswith("load_cfg-error") for event in out["sent"])
