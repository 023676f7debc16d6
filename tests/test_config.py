from pathlib import Path

from node.config import data_dir


def test_data_dir_precedence(tmp_path):
    env = {"LLMARKET_HOME": str(tmp_path / "from-env")}
    assert data_dir(tmp_path / "flag", env) == tmp_path / "flag"
    assert data_dir(None, env) == tmp_path / "from-env"
    assert data_dir(None, {}) == Path.home() / ".local" / "share" / "llmarket"
    assert data_dir("~/x", {}) == Path.home() / "x"
