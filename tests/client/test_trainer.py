import pytest
import torch

from client.trainer import evaluate, make_optimizer, train_steps
from strategies.sparse.engine import DSTConfig, DSTController
from tasks.models import build_model


def _blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated Gaussian blobs in 30-D: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 30, generator=g) * 0.5 + (y[:, None].float() * 2 - 1) * 1.5
    return x, y


def test_dense_training_reduces_loss_and_is_seeded() -> None:
    x, y = _blobs()
    model = build_model("mlp", (30,), 2, seed=0)
    loss0, acc0 = evaluate(model, x, y)
    opt = make_optimizer(model, "sgd", 0.05)
    res = train_steps(model, None, opt, x, y, 60, 32, torch.Generator().manual_seed(0))
    loss1, acc1 = evaluate(model, x, y)
    assert res.steps == 60 and res.num_examples == 200 and (res.dropped, res.grown) == (0, 0)
    assert loss1 < loss0 / 4 and acc1 == 1.0 and 0.0 <= acc0 <= 1.0
    # same seeds -> bit-identical weights
    again = build_model("mlp", (30,), 2, seed=0)
    train_steps(again, None, make_optimizer(again, "sgd", 0.05), x, y, 60, 32,
                torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(),
                                                  strict=True))


@pytest.mark.parametrize(("rule", "opt_name"), [("static", "sgd"), ("rigl", "sgd"),
                                                 ("set", "adam"), ("gmp", "sgd")])
def test_sparse_training_keeps_masked_weights_zero(rule: str, opt_name: str) -> None:
    x, y = _blobs()
    model = build_model("mlp", (30,), 2, seed=0)
    lr = 0.01 if opt_name == "adam" else 0.05
    opt = make_optimizer(model, opt_name, lr, weight_decay=1e-3)  # decay would move zeros
    ctrl = DSTController(model, opt, DSTConfig(rule=rule, density=0.2, update_interval=5),
                         total_steps=60, generator=torch.Generator().manual_seed(1))
    loss0, _ = evaluate(model, x, y)
    res = train_steps(model, ctrl, opt, x, y, 60, 32, torch.Generator().manual_seed(0))
    loss1, acc1 = evaluate(model, x, y)
    assert loss1 < loss0 and acc1 >= 0.95
    params = dict(model.named_parameters())
    for name, m in ctrl.mask.items():
        assert torch.count_nonzero(params[name].detach()[~m]) == 0
    assert ctrl.step_count == 60
    if rule in ("set", "rigl"):
        assert res.dropped == res.grown > 0
    if rule == "gmp":
        assert res.dropped > 0 and res.grown == 0
    assert abs(ctrl.density - 0.2) < 0.01


def test_epoch_sampling_visits_every_example_once() -> None:
    # a model that records the examples it sees; 4 steps of 5 over 20 examples = one epoch
    seen: list[int] = []

    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.extend(int(v) for v in x[:, 0])
            return self.w(x)

    model = Spy()
    x = torch.arange(20, dtype=torch.float32)[:, None]
    y = torch.zeros(20, dtype=torch.long)
    train_steps(model, None, make_optimizer(model, "sgd", 0.01), x, y, 4, 5,
                torch.Generator().manual_seed(0))
    assert sorted(seen) == list(range(20))


def test_evaluate_restores_mode_and_bad_input() -> None:
    model = build_model("mlp", (30,), 2)
    x, y = _blobs(10)
    model.train()
    _, acc = evaluate(model, x, y, batch_size=3)
    assert model.training and 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="x has 10 examples but y has 9"):
        evaluate(model, x, y[:9])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train_steps(model, None, make_optimizer(model), x, y, 1, 0, torch.Generator())
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer(model, "rmsprop", 0.1)
    with pytest.raises(ValueError, match="lr must be a positive"):
        make_optimizer(model, "sgd", 0.0)


def test_fedprox_term_pulls_toward_the_anchor_exactly() -> None:
    """One plain SGD step: w1 = w0 - lr (g_ce + mu (w0 - anchor)); with anchor = w0 + 1 the
    proximal step differs from the mu = 0 step by exactly lr * mu on every weight."""
    from client.trainer import train_steps

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 4)
    outs = []
    for mu in (0.0, 2.0):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        anchor = {k: v.detach() + 1.0 for k, v in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        train_steps(model, None, opt, x, y, 1, 8, gen, proximal_mu=mu, anchor=anchor)
        outs.append(model.weight.detach().clone())
    assert torch.allclose(outs[1] - outs[0], torch.full_like(outs[0], 0.1 * 2.0), atol=1e-6)


def test_proximal_mu_travels_like_flowers_fedprox() -> None:
    """Flower's FedProx puts "proximal-mu" in the train config; leanfed's runner does the same,
    so the ClientApp's term works under SparseFedAvg and Flower's FedAvg/FedProx alike."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedProx

    from tests.strategies.aggregation.test_strategy import FakeGrid

    strategy = FedProx(proximal_mu=0.3)
    grid = FakeGrid([1, 2], lambda msg, held: msg)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    msgs = strategy.configure_train(1, ArrayRecord({}), ConfigRecord(), grid)
    assert all(m.content.config_records["config"]["proximal-mu"] == 0.3 for m in msgs)
    import inspect

    import server.runner as runner

    assert '"proximal-mu": cfg.local_proximal_mu' in inspect.getsource(runner.run_federated)
