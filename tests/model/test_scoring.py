"""Next-token log-probs equal an unpadded forward per row (padding changes nothing); KL by hand."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.model.scoring import kl_divergence, next_token_logprobs, sequence_logprobs
from tests.factories import build_model

SEQS = [[3, 17, 5, 9, 44, 2], [8], [12, 13, 14], [90, 1, 1, 60, 7, 7, 7, 30], [21, 22]]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):  # noqa: ANN001, ANN201
    return build_model(request.param, seed=1)


def test_next_token_logprobs_equal_unpadded_rows(model) -> None:  # noqa: ANN001
    with torch.no_grad():
        expected = torch.stack([torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0, -1].float(), -1)
                                for s in SEQS])
    for pad, batch_size in ((0, 2), (95, 5), (0, 1)):  # other pad ids and batchings give the same rows
        got = next_token_logprobs(model, SEQS, pad, batch_size=batch_size)
        assert got.dtype == torch.float32 and got.shape == (len(SEQS), 96)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_sequence_logprobs_equal_unpadded_rows(model) -> None:  # noqa: ANN001
    got = sequence_logprobs(model, SEQS, pad=0)
    for s, lp in zip(SEQS, got, strict=True):
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1)
        assert lp.shape == (len(s), 96)
        torch.testing.assert_close(lp, expected, atol=2e-5, rtol=1e-5)


def test_kl_divergence_by_hand() -> None:
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.3, 0.3, 0.4]])
    row1 = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # = ln(2) / 4
    row2 = 0.1 * math.log(0.1 / 0.3) + 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.4)
    assert kl_divergence(p.log(), q.log()) == pytest.approx((row1 + row2) / 2, rel=1e-6)
    assert kl_divergence(p.log(), p.log()) == 0.0
    assert kl_divergence(q.log(), p.log()) != pytest.approx(kl_divergence(p.log(), q.log()))  # not symmetric
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_divergence(p.log(), q[:, :2].log())
