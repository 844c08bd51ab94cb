"""Deploy helpers; deployments on a real stack are in test_operations.py, the inbox
watcher's bookkeeping in test_arrival.py."""

from __future__ import annotations



from flows.deploy import parameter_schema


def test_parameter_schema_from_source_matches_prefects() -> None:
    """Read from the source without importing the module (the pipeline's imports cost 30 s)."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    ours = parameter_schema("flows.arrival.watch_inbox").model_dump(exclude_unset=True)
    assert ours == parameter_schema_from_entrypoint(
        "flows.arrival.watch_inbox").model_dump(exclude_unset=True)
    pipeline = parameter_schema("flows.pipeline.finetune_pipeline").model_dump()
    assert {"config_path", "overrides", "run_id", "files"} <= set(pipeline["properties"])
