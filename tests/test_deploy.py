"""The inbox poller's bookkeeping; deployments on a real stack are in test_operations.py."""

from __future__ import annotations

from pathlib import Path


from flows.deploy import new_files, parameter_schema


def test_new_files_reports_each_content_once(tmp_path: Path) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state.json"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text('{"text": "one"}\n')
    (inbox / "notes.txt").write_text("not data")
    assert new_files(inbox, state) == [str(inbox / "a.jsonl")]
    assert new_files(inbox, state) == []  # nothing new: no second run for the same data
    (inbox / "a.jsonl").write_text('{"text": "one, edited"}\n')
    (inbox / "b.parquet").write_bytes(b"PAR1")
    assert sorted(new_files(inbox, state)) == [str(inbox / "a.jsonl"), str(inbox / "b.parquet")]


def test_parameter_schema_from_source_matches_prefects() -> None:
    """Read from the source without importing the module (the pipeline's imports cost 30 s)."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    ours = parameter_schema("flows.deploy.watch_inbox").model_dump(exclude_unset=True)
    assert ours == parameter_schema_from_entrypoint(
        "flows.deploy.watch_inbox").model_dump(exclude_unset=True)
    pipeline = parameter_schema("flows.pipeline.finetune_pipeline").model_dump()
    assert {"config_path", "overrides", "run_id"} <= set(pipeline["properties"])
