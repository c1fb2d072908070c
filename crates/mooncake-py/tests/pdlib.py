"""The tests use the package's tiny model (`mooncake.tiny_model`)."""

from mooncake.tiny_model import *  # noqa: F401,F403
from mooncake.tiny_model import _rms, _rope  # noqa: F401
