"""The PHI key's checks (radscan.phi.load_phi_key): a key that can be guessed is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radscan.errors import SettingError
from radscan.phi import MIN_KEY_CHARACTERS, load_phi_key


@given(st.text(min_size=1, max_size=40).filter(lambda key: key.strip()))
def test_a_given_key_is_refused_below_sixteen_characters_and_never_shown(key):
    if len(key.strip()) < MIN_KEY_CHARACTERS:  # characters, not bytes (eight accented letters are eight), no padding
        with pytest.raises(SettingError) as refused:
            load_phi_key(key, key_file=Path("/nonexistent/phi.key"))
        assert f"has {len(key.strip())} characters" in str(refused.value) and "or the settings" in str(refused.value)
        assert "key file (--phi-key-file" in str(refused.value)
    else:
        assert load_phi_key(key, key_file=Path("/nonexistent/phi.key")) == key.encode()


def test_the_refusal_never_shows_the_key():
    with pytest.raises(SettingError) as refused:
        load_phi_key("Zq9#xV-secret", Path("/nonexistent/phi.key"))
    assert "Zq9" not in str(refused.value) and "secret" not in str(refused.value)


def test_a_short_key_file_is_refused_with_the_file_s_remedy(tmp_path):
    key_file = tmp_path / "phi.key"
    key_file.write_text("abc\n")
    with pytest.raises(SettingError, match="put a key of at least 16 random characters in it, or delete it"):
        load_phi_key(None, key_file)
    key_file.unlink()
    made = load_phi_key(None, key_file)  # made on first use: 64 hex digits
    assert len(made) == 64 and load_phi_key(None, key_file) == made


@pytest.mark.parametrize("key", ["abcdefghijklmn  ", "  abcdefghijklmn", "abcdefghijklmno\n "])
def test_spaces_do_not_count_towards_the_length(key):
    with pytest.raises(SettingError, match="characters: a key that short"):
        load_phi_key(key, Path("/nonexistent/phi.key"))


@pytest.mark.parametrize("reported_at", ["write", "sync"])
def test_a_full_disk_while_making_the_key_is_exit_73_and_leaves_no_empty_key(tmp_path, monkeypatch, reported_at):
    """A review: a disk that filled while a new key was written was exit 1 "a bug", and left an
    empty key file that every later run refused ("the PHI key file ... is empty")."""
    import errno
    import io
    import os

    from radscan.errors import ExitCode, OutputError

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullFile(io.FileIO):
        write = full

    key_file = tmp_path / "radscan" / "phi.key"
    if reported_at == "write":
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullFile(fd, "wb"))
    else:
        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device") as raised:
        load_phi_key(None, key_file)
    assert raised.value.exit_code == ExitCode.CANT_CREATE and not key_file.exists()
    monkeypatch.undo()
    key = load_phi_key(None, key_file)  # the next run makes one
    assert len(key) == 64 and key_file.read_bytes().strip() == key
