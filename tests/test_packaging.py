"""The source folder is called platform/ and must never shadow the standard library's platform module."""

import platform
import sysconfig
from pathlib import Path

from conftest import REPO


def test_platform_is_still_the_standard_library():
    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert callable(platform.system)


def test_platform_folder_has_no_init():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert (REPO / "platform" / "pretrainlab" / "__init__.py").is_file()
