"""The wire contracts: fresh stubs, every field documented, optional where zero means something."""

import re
import subprocess
import sys
from pathlib import Path

from pagoda.v1 import api_pb2, common_pb2, kv_events_pb2, session_pb2, step_pb2

ROOT = Path(__file__).resolve().parents[3]
PROTOS = sorted((ROOT / "proto" / "pagoda" / "v1").glob("*.proto"))


def test_committed_stubs_equal_what_the_script_generates():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_every_field_message_enum_value_and_service_has_a_comment():
    field = re.compile(r"^\s*(optional |repeated )?[\w.]+ \w+ = \d+;")
    value = re.compile(r"^\s*[A-Z_0-9]+ = \d+;")
    decl = re.compile(r"^\s*(message|service|enum) \w+")
    missing = []
    for path in PROTOS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if field.match(line) or value.match(line) or decl.match(line):
                j = i - 1
                # A comment may sit above a group of fields in a oneof, not above its braces.
                while j >= 0 and lines[j].strip().startswith("oneof"):
                    j -= 1
                if j < 0 or not lines[j].strip().startswith("//"):
                    missing.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not missing, "undocumented:\n" + "\n".join(missing)


def test_fields_whose_zero_means_something_are_optional():
    s = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    for name in (
        "temperature",
        "top_p",
        "repetition_penalty",
        "seed",
        "max_tokens",
        "logprobs",
        "prompt_logprobs",
        "skip_special_tokens",
        "spaces_between_special_tokens",
    ):
        assert s[name].has_presence, name
    assert session_pb2.SequenceFinished.DESCRIPTOR.fields_by_name["stop_token_id"].has_presence


def test_the_architecture_fields_are_on_the_wire():
    def names(msg) -> set[str]:
        return set(msg.DESCRIPTOR.fields_by_name)

    assert {
        "protocol_version",
        "worker_id",
        "model_identity",
        "vocab_size",
        "eos_token_ids",
        "max_model_len",
        "tp_rank",
        "tp_size",
        "num_kv_blocks",
        "block_size",
        "dtype",
        "device",
        "shared_secret",
    } <= names(step_pb2.Hello)
    assert {"replica_id", "epoch", "tp_rank", "tp_rendezvous", "config"} <= names(step_pb2.Welcome)
    assert {
        "replica_id",
        "epoch",
        "step",
        "new_sequences",
        "running_seqs",
        "running_num_new_tokens",
        "new_blocks",
        "finished_seqs",
        "preempted_seqs",
    } <= names(step_pb2.StepPlan)
    assert {
        "seq",
        "token_ids",
        "num_prompt_tokens",
        "sampling",
        "seed",
        "sample_index",
        "block_ids",
        "num_cached_tokens",
        "num_new_tokens",
    } <= names(step_pb2.NewSequence)
    assert {"replica_id", "epoch", "step", "seqs", "token_ids", "logprobs", "prompt_logprobs"} <= (
        names(step_pb2.StepResult)
    )
    assert {
        "request_id",
        "prompt_token_ids",
        "sampling",
        "priority",
        "deadline_unix_ms",
        "cache_salt",
        "lora_id",
        "structured_output",
    } <= names(session_pb2.Submit)
    assert "prompt_logprobs" in names(common_pb2.SamplingParams)
    assert {"protocol_version", "session_id", "model"} <= names(session_pb2.SessionOpened)
    assert {"identity", "vocab_size", "eos_token_ids", "max_model_len"} <= names(
        common_pb2.ModelInfo
    )
    assert {"sequence_number", "replica_id", "block_size", "stored", "removed"} <= names(
        kv_events_pb2.KvEvent
    )
    assert {"block_hash", "parent_hash", "token_ids"} <= names(kv_events_pb2.BlockStored)
    methods = {m.name for m in api_pb2.DESCRIPTOR.services_by_name["Generation"].methods}
    assert methods == {"Generate", "Complete", "Tokenize", "ListModels"}
    session = session_pb2.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name["Session"]
    assert session.client_streaming and session.server_streaming
