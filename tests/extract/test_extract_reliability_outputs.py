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


# ------------------------------------------------------------------------------ item 17
def test_a_named_pipe_in_place_of_a_video_fails_at_once_in_process(tmp_path):
    import os
    import signal

    from extract.decode import DecodeFailure, DecodePool, DecodeTask

    os.mkfifo(tmp_path / "v0.mp4")
    os.makedirs(tmp_path / "frames")
    os.mkfifo(tmp_path / "frames" / "img_00001.jpg")
    tasks = [DecodeTask(0, "jump/v0", str(tmp_path / "v0.mp4"), "file", frames=2),
             DecodeTask(1, "jump/v1", str(tmp_path / "frames"), "frames", frames=1)]

    def hung(signum, frame):
        raise TimeoutError("decoding a named pipe hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        results = list(DecodePool(workers=0).imap(tasks))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert all(isinstance(r, DecodeFailure) for r in results)
    assert all("not a regular file" in r.reason for r in results)
