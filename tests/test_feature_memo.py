"""`FeatureMemo`: a model whose weights equal an earlier one's is not encoded again (WiSE-FT's
α = 0 at every seed, a linear probe's frozen image tower), and what it returns is what
`encode_images` returns, bit for bit."""

import copy

import torch
from torch import nn

from pipeline.models.encode import FeatureMemo, encode_images, weights_digest
from pipeline.models.evalmodel import EvalModel


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(12, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, x):
        return self.visual(x.flatten(1))


class Counting(EvalModel):
    calls = 0

    def encode_image(self, images):
        Counting.calls += 1
        return super().encode_image(images)


def test_equal_weights_are_encoded_once_and_give_encode_images_own_result():
    torch.manual_seed(0)
    images = torch.randn(10, 3, 2, 2)
    base = Tower()
    a = Counting(copy.deepcopy(base), head=torch.randn(3, 4))
    b = Counting(copy.deepcopy(base), head=torch.randn(3, 4))  # another head: the same image features
    memo = FeatureMemo()
    Counting.calls = 0
    fa = memo.encode(weights_digest(a), a, images, "cpu", batch_size=4)
    fb = memo.encode(weights_digest(b), b, images, "cpu", batch_size=4)
    assert Counting.calls == 3 and memo.hits == 1  # 3 batches, once
    assert torch.equal(fa, fb) and torch.equal(fa, encode_images(a, images, "cpu", batch_size=4))
    fa.zero_()  # a caller's in-place change does not reach the memo
    assert torch.equal(memo.encode(weights_digest(a), a, images, "cpu"), fb)

    c = Counting(copy.deepcopy(base))
    with torch.no_grad():
        c.model.visual.weight[0, 0] += 1e-6  # one weight moved: encoded again
    assert weights_digest(c) != weights_digest(a)
    fc = memo.encode(weights_digest(c), c, images, "cpu")
    assert memo.hits == 2 and not torch.equal(fc, fb)
    other = images.clone()  # equal images, another set: encoded again (keyed by the set, not its values)
    memo.encode(weights_digest(a), a, other, "cpu")
    assert memo.hits == 2


def test_the_memo_keeps_at_most_its_budget_dropping_the_least_recently_used():
    images = [torch.randn(5, 3, 2, 2) for _ in range(3)]
    model = EvalModel(Tower())
    digest = weights_digest(model)
    memo = FeatureMemo(budget=2 * 5 * 4 * 4)  # two sets' features (5 x 4 float32 each)
    memo.encode(digest, model, images[0], "cpu")
    memo.encode(digest, model, images[1], "cpu")
    memo.encode(digest, model, images[0], "cpu")  # used again: the most recent
    memo.encode(digest, model, images[2], "cpu")  # over budget: images[1] goes
    assert memo.hits == 1
    memo.encode(digest, model, images[0], "cpu")
    assert memo.hits == 2
    memo.encode(digest, model, images[1], "cpu")
    assert memo.hits == 2
