"""The generated stubs match proto/generate.proto, and messages round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pytgi_proto import generate_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_match_the_proto():
    result = subprocess.run([sys.executable, str(ROOT / "proto" / "build.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_request_round_trip():
    request = pb.Request(
        id=2**64 - 1, input_ids=[1, 2, 3], blocks=[4, 5], cache_len=2, chunk_len=1,
        parameters=pb.NextTokenChooserParameters(temperature=0.5, logit_bias={7: -2.5}, seed=9, has_seed=True),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=4, stop_token_ids=[11]),
    )
    decoded = pb.Request.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.HasField("chunk_len") and dict(decoded.parameters.logit_bias) == {7: -2.5}
    assert not pb.Request(id=1).HasField("chunk_len")  # unset means "all remaining tokens"
