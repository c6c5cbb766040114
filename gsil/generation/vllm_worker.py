"""Runs inside vLLM's worker processes (``worker_extension_cls``): load new policy weights.

vLLM loads weights once, from disk, then post-processes them (on CPUs its linear layers are
repacked for oneDNN and their ``weight`` emptied, so ``model.load_weights`` cannot be called
again: the parameters it writes into are gone). Each round gsil sends the policy's state dict
in memory (safetensors bytes) and this method rebuilds what the first load built: empty linear
weights are re-created with their loaders, the checkpoint-format tensors go through the
model's own ``load_weights`` (q/k/v and gate/up fused as at start-up), and vLLM's own
``process_weights_after_loading`` repacks them.
"""

from __future__ import annotations


class PolicyWeightLoader:
    """Mixed into vLLM's worker class; called through ``LLM.collective_rpc``."""

    def load_policy_weights(self, blob: bytes) -> int:
        """Load a safetensors blob of checkpoint-format weights; returns how many were loaded."""
        from safetensors.torch import load
        from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        model = self.model_runner.model
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, LinearBase) and weight is not None and weight.numel() == 0:
                v2 = type(module.quant_method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
                module.quant_method.create_weights(
                    layer=module,
                    input_size_per_partition=getattr(
                        module, "input_size_per_partition", module.input_size
                    ),
                    output_partition_sizes=module.output_partition_sizes,
                    input_size=module.input_size,
                    output_size=module.output_size,
                    params_dtype=module.params_dtype,
                    weight_loader=module.weight_loader_v2 if v2 else module.weight_loader,
                )
        loaded = model.load_weights(load(blob).items())
        process_weights_after_loading(
            model, self.vllm_config.model_config, self.model_runner.device
        )
        return len(loaded) if loaded is not None else -1

    def policy_param_sums(self) -> dict[str, float]:
        """Per-parameter sums of the live model (a cheap fingerprint for tests)."""
        return {n: float(p.double().sum()) for n, p in self.model_runner.model.named_parameters()}
