"""mixer_jax.steps: the training and eval steps against a model's pure functions (accumulation,
label smoothing, mixup, uint8 input, top-5) for both Flax APIs, that NNX steps equal Linen's and its
random masks are a function of (seed, step), and that any model API with init/apply plugs in."""
import functools

import numpy as np
import pytest

from conftest import requires_jax

pytestmark = requires_jax
BATCH, CLASSES = 32, 10


def tiny_model_cfg(**kw):
    from mixer_convert.spec import MixerConfig
    return MixerConfig(patch_size=4, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=16,
                       num_classes=CLASSES, image_size=16, **kw)


def train_state(model_cfg, api):
    import jax
    from functools import partial
    from mixer_jax.configs import OptimConfig
    from mixer_jax.optimizer import make_optimizer
    from mixer_jax.steps import create_train_state, model_fns

    tx, _ = make_optimizer(OptimConfig(name="sgd", lr=0.05, warmup_steps=2), 10)
    return jax.jit(partial(create_train_state, model_fns(model_cfg, api=api), tx))(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def batch():
    from mixer_jax.input_pipeline import make_source
    from mixer_jax.input_pipeline import TrainBatches
    from helpers.training import tiny_digits

    cfg = tiny_digits()
    x, y, _, _ = TrainBatches(make_source(cfg.data, "train"), cfg.data, BATCH, seed=0)(0)
    return x, y


@pytest.fixture(scope="module", params=["linen", "nnx"])
def setup(request, batch):
    """A one-block Mixer (small to compile) in each Flax API, its state, one uint8 batch of digits
    and a jitted step."""
    import jax
    from functools import partial
    from mixer_jax.steps import model_fns, train_step

    model_cfg = tiny_model_cfg()
    state = train_state(model_cfg, request.param)  # jitted: eager init is 3x slower
    step = jax.jit(partial(train_step, num_classes=CLASSES))
    return model_fns(model_cfg, api=request.param), state, *batch, step


def _split(x, y, accum):
    return x.reshape(accum, BATCH // accum, *x.shape[1:]), y.reshape(accum, -1)


@pytest.mark.slow  # 6-8 s of compilation per API; the step runs in the fast tier below
def test_gradient_accumulation_equals_one_big_batch(setup):
    import jax

    _, state, x, y, step = setup
    outs = [step(state, *_split(x, y, accum), jax.random.PRNGKey(1)) for accum in (1, 4)]
    leaves = zip(jax.tree_util.tree_leaves(outs[0][0].params), jax.tree_util.tree_leaves(outs[1][0].params))
    assert max(float(np.abs(a - b).max()) for a, b in leaves) < 1e-6
    assert float(outs[0][1]["loss"]) == pytest.approx(float(outs[1][1]["loss"]), abs=1e-6)


@pytest.mark.slow  # 6-8 s of compilation per API; the step runs in the fast tier below
def test_label_smoothing_and_mixup_build_the_documented_targets(setup):
    import jax
    import jax.numpy as jnp
    import optax
    from mixer_jax.input_pipeline import normalize
    from mixer_jax.steps import cross_entropy, loss_fn

    fns, state, x, y, _ = setup
    x = normalize(x)  # loss_fn takes model inputs; train_step normalises the pipeline's uint8
    noise = np.random.default_rng(7)  # away from the zero head, so that the logits differ
    params = jax.tree_util.tree_map(lambda p: p + np.float32(0.1) * noise.standard_normal(p.shape, np.float32),
                                    state.params)
    rng = jax.random.PRNGKey(3)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    onehot = jax.nn.one_hot(y, CLASSES)
    logits = jax.jit(lambda images: fns.apply(params, images, False, None))
    loss = jax.jit(loss_fn, static_argnums=(1, 5, 6, 7))

    got, correct = loss(params, fns.apply, x, y, rng, CLASSES, 0.1, 0.0)
    want = cross_entropy(logits(x), optax.smooth_labels(onehot, 0.1)).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert int(correct) == int(jnp.sum(jnp.argmax(logits(x), -1) == y))

    # mixup: each batch mixed with its reverse, weight lam ~ Beta(a, a) from the step's key
    got, correct = loss(params, fns.apply, x, y, rng, CLASSES, 0.0, 0.4)
    lam = jax.jit(jax.random.beta, static_argnums=(1, 2))(jax.random.split(rng)[0], 0.4, 0.4)
    mixed_x = lam * x + (1 - lam) * x[::-1]
    want = cross_entropy(logits(mixed_x), lam * onehot + (1 - lam) * onehot[::-1]).mean()
    assert 0 < float(lam) < 1 and float(got) == pytest.approx(float(want), rel=1e-5)
    assert int(correct) == int(jnp.sum(jnp.argmax(logits(mixed_x), -1) == y))  # accuracy vs the true labels


@pytest.mark.slow  # uint8 input is normalised like this in the fast tier: test_input_pipeline.py
def test_uint8_batches_are_normalised_on_the_device_like_float_batches(setup):
    import jax
    from mixer_jax.input_pipeline import normalize
    from mixer_jax.steps import eval_step

    _, state, x, y, step = setup
    assert x.dtype == np.uint8
    xs, ys = _split(x, y, 1)
    (new_u8, _), (new_f32, _) = (step(state, a, ys, jax.random.PRNGKey(1)) for a in (xs, np.asarray(normalize(xs))))
    for a, b in zip(jax.tree_util.tree_leaves(new_u8.params), jax.tree_util.tree_leaves(new_f32.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mask = np.ones(BATCH, bool)
    ev = jax.jit(eval_step)
    assert float(ev(new_u8, x, y, mask)["correct"]) == float(ev(new_u8, np.asarray(normalize(x)), y, mask)["correct"])


def _fixed_logits_state(logits):
    from mixer_jax.steps import TrainState
    return TrainState(step=0, apply_fn=lambda params, images, train, rng: logits, params={}, tx=None,
                      opt_state=None)


def test_top5_counts_labels_among_the_five_largest_logits():
    from mixer_jax.steps import eval_step

    logits = np.array([[9, 8, 7, 6, 5, 4, 0], [0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]], np.float32)
    labels = np.array([4, 0, 0])  # 5th best, worst, best
    out = eval_step(_fixed_logits_state(logits), np.zeros((3, 1, 1, 3), np.float32), labels,
                    np.array([True, True, False]))
    assert (int(out["correct"]), int(out["correct5"]), int(out["count"])) == (0, 1, 2)


def test_any_model_api_with_pure_init_and_apply_trains_through_the_same_step():
    """What a second API (NNX through nnx.split/merge) must provide: ModelFns(init, apply). A linear
    classifier on the mean colour, written as plain functions, is trained by train_step."""
    import jax
    import jax.numpy as jnp
    import optax
    from mixer_jax.steps import ModelFns, create_train_state, eval_step, train_step

    def init(rng):
        return {"head": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}

    def apply(params, images, train, rng):
        return images.mean(axis=(1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]

    state = create_train_state(ModelFns(init, apply), optax.sgd(1.0), jax.random.PRNGKey(0))
    x = np.concatenate([np.full((8, 2, 2, 3), 40, np.uint8), np.full((8, 2, 2, 3), 220, np.uint8)])
    y = np.array([0] * 8 + [1] * 8)
    for _ in range(30):
        state, m = train_step(state, x[None], y[None], jax.random.PRNGKey(0), num_classes=2)
    assert float(m["accuracy"]) == 1.0 and int(state.step) == 30
    assert int(eval_step(state, x, y, np.ones(16, bool))["correct"]) == 16


def test_an_unknown_model_api_is_a_clear_error():
    from mixer_convert.spec import config_for
    from mixer_jax.steps import model_fns

    with pytest.raises(ValueError, match="unknown model API 'keras'; expected one of linen, nnx"):
        model_fns(config_for("S/32"), api="keras")


def test_every_api_a_config_may_name_is_registered():
    from mixer_jax.configs import MODEL_API_NAMES
    from mixer_jax.steps import MODEL_APIS

    assert tuple(MODEL_APIS) == MODEL_API_NAMES


@functools.cache
def _regularised_step():
    import jax
    from mixer_jax.steps import train_step

    return jax.jit(functools.partial(train_step, num_classes=CLASSES, label_smoothing=0.1, mixup_alpha=0.2))


def _steps(state, x, y, rngs, accum=1):
    """(params, loss) after each step from ``state``, one step per rng (label smoothing and mixup on)."""
    import jax

    step = _regularised_step()  # one jitted function: compiled once per model and batch shape
    out = []
    for rng in rngs:
        state, m = step(state, *_split(x, y, accum), rng)
        out.append((jax.tree_util.tree_map(np.asarray, state.params), float(m["loss"])))
    return out


@pytest.mark.parametrize("accum", [1, pytest.param(2, marks=pytest.mark.slow)])  # accumulation: ~12 s of compiles
def test_nnx_train_steps_equal_linen_steps_from_the_same_seed(batch, accum):
    import jax

    rngs = [jax.random.PRNGKey(1)] * 3
    (linen, nnx) = (_steps(train_state(tiny_model_cfg(), api), *batch, rngs, accum) for api in ("linen", "nnx"))
    for (p_linen, loss_linen), (p_nnx, loss_nnx) in zip(linen, nnx):
        assert loss_nnx == loss_linen
        jax.tree_util.tree_map(np.testing.assert_array_equal, p_nnx, p_linen)


@pytest.mark.slow  # ~14 s of compiles; NNX's training masks are in the fast tier through test_models.py
def test_nnx_dropout_and_stochastic_depth_masks_are_a_function_of_seed_and_step(batch):
    import jax

    regularised = tiny_model_cfg(stoch_depth=0.5, dropout_rate=0.3)
    state = train_state(regularised, "nnx")
    # (the zero head and the warmup from lr 0 make the first two losses log(10) whatever the masks)
    same, again, other_seed = (_steps(state, *batch, [jax.random.PRNGKey(seed)] * 3) for seed in (1, 1, 2))
    plain = _steps(train_state(tiny_model_cfg(), "nnx"), *batch, [jax.random.PRNGKey(1)] * 3)
    assert [loss for _, loss in same] == [loss for _, loss in again]  # deterministic per (seed, step)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same[-1][0], again[-1][0])
    assert len({same[-1][1], other_seed[-1][1], plain[-1][1]}) == 3  # another seed, other masks; they do mask
