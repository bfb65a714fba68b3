"""Review regressions for the why-probes (independent checks)."""

from __future__ import annotations

import pytest
import torch

from normbench.probes.similarity import mean_cosine_similarity


@pytest.mark.parametrize("scale", [2e17, 1e-23])
def test_similarity_is_scale_invariant_for_huge_and_tiny_activations(scale):
    # A cosine does not depend on the scale of the activations. A diverging unnormalized net
    # reaches activations whose squared per-sample norm overflows float32 (> 3.4e38) while
    # its loss is still finite: the norm is then inf, every row is scaled by 1/inf = 0, and
    # the layer reports -1/(n-1) (here -1/7), a plausible-looking finite value. Tiny
    # activations (squared norm subnormal in float32) give 1.06 here, clamped to 1.0 by
    # SimilarityProbe.take: a false "complete collapse".
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16)
    expected = float(mean_cosine_similarity(x))
    got = float(mean_cosine_similarity(x * scale))
    assert got == pytest.approx(expected, abs=1e-5)
