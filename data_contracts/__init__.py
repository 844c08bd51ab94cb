"""Data contracts: record forms, the stage ledger and the run config."""

from data_contracts.config import ConfigError, PipelineConfig, load_config
from data_contracts.manifest import LedgerError, Manifest
from data_contracts.records import ChatSample, Message, RecordError, Source, parse_record

__all__ = [
    "ChatSample", "ConfigError", "LedgerError", "Manifest", "Message", "PipelineConfig",
    "RecordError", "Source", "load_config", "parse_record",
]
