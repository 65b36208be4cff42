#!/usr/bin/env bash
# Every stage of the CIFAR-10 profile on CPU with tiny budgets: checks the profile end to end (data, UNet sizes,
# guidance, every stage's outputs, lineage) before a GPU run. Quality numbers are meaningless at these budgets.
#
#   scripts/smoke_cifar10_cpu.sh /data/cifar-10-python.tar.gz [more --set overrides...]
#
# Uses a seeded subset of 200 images (data.max_samples). Like `python -m flows.profile`, it writes the overrides into
# params.yaml and saves the DVC experiment `profile-cifar10`; `git checkout params.yaml` goes back.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
archive=$1; shift
tiny=(
  "data.path=$archive" data.max_samples=200 shard.samples_per_shard=25 shard.min_shards=2
  model.unet.base_channels=8 model.unet.num_res_blocks=1
  teacher.steps=20 teacher.batch_size=16 teacher.warmup_steps=0 teacher.checkpoint_every=0 teacher.log_every=5
  teacher.plot_samples=8 teacher.sampler.steps=4
  featurizer.steps=20 featurizer.batch_size=16
  couplings.count=32 couplings.batch_size=16 couplings.nfe=4 couplings.error_samples=4 couplings.samples_per_shard=16
  couplings.samples_per_record=8
  reflow.steps=5 reflow.batch_size=16 reflow.warmup_steps=0 reflow.checkpoint_every=0 reflow.distill_steps=3
  progressive.teacher_steps=4 progressive.steps=3 progressive.batch_size=16 progressive.warmup_steps=0
  progressive.checkpoint_every=0
  consistency.steps=5 consistency.batch_size=16 consistency.warmup_steps=0 consistency.checkpoint_every=0
  preferences.groups=2 preferences.k=16 preferences.nfe=4
  dpo.steps=3 dpo.batch_size=2 dpo.warmup_steps=0 dpo.checkpoint_every=0
  "evaluate.nfe=[1, 2, 4]" evaluate.n_samples=20 evaluate.straightness_steps=4 evaluate.image_grid_size=8
)
sets=()
for o in "${tiny[@]}" "$@"; do sets+=(--set "$o"); done
python -m flows.profile cifar10 "${sets[@]}"
python -m flows.summary
