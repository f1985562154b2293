"""Server folders typed into the demo: confined to CLIPDECOMP_FOLDER_ROOT, refused on a Space without it."""

from __future__ import annotations

import pytest

from clipdecomp.errors import InputError
from demo.limits import check_folder


def test_folders_outside_the_root_are_refused(tmp_path, monkeypatch):
    inside = tmp_path / "root" / "images"
    inside.mkdir(parents=True)
    monkeypatch.setenv("CLIPDECOMP_FOLDER_ROOT", str(tmp_path / "root"))
    assert check_folder("images") == inside.resolve()
    with pytest.raises(InputError, match="must be inside"):
        check_folder(str(tmp_path))
    with pytest.raises(InputError, match="must be inside"):
        check_folder("images/../../")


def test_a_space_without_a_root_refuses_every_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPDECOMP_FOLDER_ROOT", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/clipdecomp")
    with pytest.raises(InputError, match="disabled on this public deployment"):
        check_folder(str(tmp_path))
    monkeypatch.delenv("SPACE_ID")
    assert check_folder(str(tmp_path)) == tmp_path
