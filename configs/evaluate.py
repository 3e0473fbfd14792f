"""Configuration of the evaluate command (`launch/evaluate.py`): metrics of image folders.

    python launch/evaluate.py --config.run_dir=runs/flux-tiny/<protocol>
    python launch/evaluate.py --config.reference=runs/ref --config.methods="int4=runs/int4,nf4=runs/nf4" \
        --config.eval.lpips_weights=weights/lpips_alex.safetensors
    python launch/evaluate.py --config.run_dir=runs/flux-dev/<protocol> --config.eval.num_prompts=1024 \
        --config.eval.benchmark=/data/MJHQ-30K/meta_data.json --config.eval.benchmark_images=/data/MJHQ-30K/imgs \
        --config.eval.inception_weights=weights/inception_fid.safetensors \
        --config.eval.clip_model=/data/clip-vit-large-patch14

Every field with its default is in `svdquant_jax.flows.evaluate.default_config` (the `eval` section
is shared with the PTQ flow: `svdquant_jax.flows.ptq_config.add_metric_fields`).
"""

from svdquant_jax.flows import evaluate


def get_config():
  return evaluate.default_config()
