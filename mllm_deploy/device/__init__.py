"""Device capabilities: the catalog of targets and the probed `host`.

Entry points: `load_capabilities(target) -> Capabilities` and `list_devices()`.
Catalog figures are public nominal specs (each data file says where they come from);
`host` is this machine, probed in a subprocess and cached (see `probe`).
"""

from __future__ import annotations

from mllm_deploy.device.catalog import HOST_ID, CatalogError, catalog_entries, device_ids, unknown_target
from mllm_deploy.device.host import OPT_INS, HexagonHere, MachineHere, OptIn, build_host, hexagon_here
from mllm_deploy.device.models import (
    Capabilities,
    ChunkSizeRule,
    CpuCluster,
    HostProbe,
    NpuCaps,
)

__all__ = [
    "HOST_ID",
    "OPT_INS",
    "Capabilities",
    "CatalogError",
    "ChunkSizeRule",
    "CpuCluster",
    "HexagonHere",
    "HostProbe",
    "MachineHere",
    "NpuCaps",
    "OptIn",
    "device_ids",
    "hexagon_here",
    "list_devices",
    "load_capabilities",
    "this_machine",
]


def load_capabilities(target: str, *, use_probe_cache: bool = True) -> Capabilities:
    """Capabilities of `target` (a catalog id). `host` is the catalog defaults plus a probe
    of this machine. Unknown ids raise UserError (exit 2) with a did-you-mean; a broken
    catalog file raises CatalogError (exit 1) naming the file."""
    entries = catalog_entries()
    if target not in entries:
        raise unknown_target(target)
    if target != HOST_ID:
        return entries[target]
    # deferred on purpose: probe.py is also run as `python -m mllm_deploy.device.probe`, and a
    # top-level import here would load it twice in that subprocess (runpy's RuntimeWarning on stderr)
    from mllm_deploy.device.probe import probe_host  # noqa: PLC0415

    return build_host(entries[HOST_ID], probe_host(use_cache=use_probe_cache))


def list_devices(*, include_host: bool = True) -> list[Capabilities]:
    """Every device, `host` (probed) first, then the catalog in id order."""
    ids = [i for i in device_ids() if include_host or i != HOST_ID]
    return [load_capabilities(i) for i in ids]


def this_machine(*, use_probe_cache: bool = True) -> MachineHere:
    """This machine: its probe (cached, see `probe`) and its Hexagon NPU identified against the
    catalog (None on x86, where the QNN HTP backend is Qualcomm's simulator)."""
    # deferred on purpose: see load_capabilities
    from mllm_deploy.device.probe import probe_host  # noqa: PLC0415

    probe = probe_host(use_cache=use_probe_cache)
    return MachineHere(probe, hexagon_here(probe, catalog_entries()))
