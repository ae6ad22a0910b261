#!/usr/bin/env bash
# Feature extraction over N GPU nodes as a SLURM array: one job per GPU, one shard per job.
#   sbatch --array=0-15 docker/slurm-extract.sh /data/coco/images /data/shards
# regionbert-extract reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT and takes its even share of
# the (sorted) input. Re-submitting the same array resumes every unfinished shard. When all jobs are
# done: regionbert-shards index /data/shards -o /data/shards/index.json && regionbert-shards verify /data/shards
#SBATCH --job-name=regionbert-extract
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --output=logs/extract-%A_%a.out
set -euo pipefail
images=${1:?usage: sbatch --array=0-N docker/slurm-extract.sh IMAGES OUT}
out=${2:?usage: sbatch --array=0-N docker/slurm-extract.sh IMAGES OUT}
# with the container instead: srun apptainer exec --nv regionbert-extract.sif regionbert-extract ...
exec regionbert-extract "$images" --out "$out" --workers "${SLURM_CPUS_PER_TASK:-8}" --batch-size 8
