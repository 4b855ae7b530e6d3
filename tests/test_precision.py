"""``--trainer.precision bf16-mixed`` on the CPU: our BN trains like torch's, statistics in float32."""

import pytest
import torch

from helpers import REPO, run_cli, scalars

pytestmark = pytest.mark.slow  # CLI fits


def test_bf16_mixed_fit_with_our_bn_follows_torchs_bn(tiny_data, tmp_path):
    losses, states = {}, {}
    for norm in ("scratch", "torch"):
        fit = run_cli("fit", "--config", str(REPO / "configs" / f"lenet_bn_{norm}.yaml"), f"--data.data_dir={tiny_data}",
                      "--data.batch_size=32", "--data.val_size=40", "--trainer.max_epochs=2",
                      "--trainer.log_every_n_steps=1", "--trainer.precision=bf16-mixed", "--test_after_fit=false",
                      "--trainer.enable_progress_bar=false", cwd=tmp_path)
        assert fit.returncode == 0, fit.stderr[-3000:]
        run_dir = tmp_path / "lightning_logs" / f"lenet_bn_{norm}" / "version_0"
        losses[norm] = torch.tensor(scalars(run_dir)["train/loss_step"])
        states[norm] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    assert len(losses["scratch"]) == 10  # 160 images in batches of 32, 2 epochs
    # Same seed, same bf16 convolutions: the two BNs differ only by float32 rounding inside BN,
    # which bf16 activations then round away or amplify a little over 10 steps.
    torch.testing.assert_close(losses["scratch"], losses["torch"], rtol=2e-2, atol=2e-2)
    for key, value in states["torch"].items():
        assert states["scratch"][key].dtype == value.dtype, key  # float32 weights and running stats
        if ".running_" in key:
            torch.testing.assert_close(states["scratch"][key], value, rtol=5e-2, atol=5e-2)
