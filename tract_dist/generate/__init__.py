"""CoT generation for stage 2: Ray Data actor pool of model replicas, resumable shards, stage-2 dataset builder."""
