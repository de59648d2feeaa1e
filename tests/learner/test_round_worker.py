"""The worker's file protocol: status events, progress across stages, errors reported."""

from __future__ import annotations

from pathlib import Path

from learner.worker import STATUS_FILE, StatusFile, main, overall_progress, read_status


def test_progress_adds_finished_stages_and_the_current_share(tmp_path: Path) -> None:
    """Progress is the weight of the stages before the current one plus its done share;
    a half-written last line is ignored; done is 100%."""
    status = StatusFile(tmp_path / STATUS_FILE)
    status.write("stage", stage="snapshot")
    status.progress("classify", 10, 10)
    status.progress("sft", 1, 4)
    with (tmp_path / STATUS_FILE).open("a") as handle:
        handle.write('{"event": "progr')
    stage, progress = overall_progress(read_status(tmp_path / STATUS_FILE))
    assert stage == "sft"
    assert abs(progress - (0.02 + 0.08 + 0.15 + 0.35 / 4)) < 1e-9
    finished = StatusFile(tmp_path / "finished.jsonl")
    finished.progress("sft", 4, 4)
    finished.write("done")
    assert overall_progress(read_status(finished.path)) == ("done", 1.0)


def test_worker_failure_is_written_to_the_status_file(tmp_path: Path) -> None:
    """A round folder without round.json exits 1 and leaves the error in status.jsonl."""
    assert main([str(tmp_path)]) == 1
    errors = [e for e in read_status(tmp_path / STATUS_FILE) if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["error"].startswith("FileNotFoundError")
    assert main([]) == 2
