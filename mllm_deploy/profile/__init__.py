"""The profile stage: a TOML profile (plus `--set` overrides) -> a validated :class:`Profile`.

Entry point: :func:`load_profile`. Every problem is a located :class:`~mllm_deploy.errors.Diagnostic`
inside a :class:`~mllm_deploy.errors.UserError` (exit code 2), all of them at once.
"""

from mllm_deploy.profile.load import default_profile_path, load_profile, load_profile_text, profile_hash
from mllm_deploy.profile.loaded import LoadedProfile
from mllm_deploy.profile.models import SCHEMA_VERSION, Profile

__all__ = [
    "SCHEMA_VERSION",
    "LoadedProfile",
    "Profile",
    "default_profile_path",
    "load_profile",
    "load_profile_text",
    "profile_hash",
]
