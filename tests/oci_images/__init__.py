"""OCI images built by code, byte for byte the same on every run (`build`), and the images the tests use
(`catalog`). ``from tests import oci_images as oi`` gives both."""

from .build import *  # noqa: F403
from .catalog import *  # noqa: F403
