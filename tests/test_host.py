"""Host tests: the pack inside a real ComfyUI (skipped with a clear message when no host is built here)."""

from __future__ import annotations

import pytest

from comfy_host import PACK_NAME, host_missing_reason, start_host

reason = host_missing_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    host = start_host(tmp_path_factory.mktemp("comfyui-host"))
    yield host
    host.stop()


def test_pack_imports_inside_comfyui_without_errors(host):
    log = host.log_text()
    ours = [line for line in log.splitlines() if PACK_NAME in line]
    # ComfyUI lists every custom-node folder under "Import times for custom nodes", marking failures
    assert any("seconds:" in line for line in ours), log[-3000:]
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in ours), "\n".join(ours)
    stats = host.get_json("/system_stats")
    assert stats["system"]["comfyui_version"]
