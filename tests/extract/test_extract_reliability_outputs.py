"""Issue 24 (phase one's other outputs): toy-data never writes into a folder it did not make,
and refuses an unwritable --out before the work."""

from click.testing import CliRunner

from cli import cli

SMALL = ["--train-classes", "1", "--val-classes", "0", "--test-classes", "1",
         "--videos-per-class", "1", "--frames", "4", "--size", "32"]


def toy(out, *extra):
    return CliRunner().invoke(cli, ["toy-data", "--out", str(out), *SMALL, *extra])


def test_toy_data_never_writes_into_a_users_folder(tmp_path):
    (tmp_path / "mine" / "splits").mkdir(parents=True)
    (tmp_path / "mine" / "splits" / "trainlist.txt").write_text("my/list\n")
    result = toy(tmp_path / "mine")
    assert result.exit_code == 1 and "not made by this tool" in result.output, result.output
    assert (tmp_path / "mine" / "splits" / "trainlist.txt").read_text() == "my/list\n"
    assert not (tmp_path / "mine" / "toydata.json").exists()


def test_toy_data_rewrites_its_own_folder(tmp_path):
    assert toy(tmp_path / "toy").exit_code == 0
    again = toy(tmp_path / "toy", "--seed", "1")  # another config into the folder it made
    assert again.exit_code == 0, again.output


def test_toy_data_refuses_an_unwritable_out_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    result = toy(tmp_path / "file" / "toy")
    assert result.exit_code == 1 and "cannot write" in result.output, result.output
    assert "Traceback" not in result.output
