"""Train, select, profile and deploy a bin-counting model.

    start -> fetch -> fetch_shard (foreach) -> pack -> split -> trial (foreach, short round) -> halve -> second_round -> extend (foreach, survivors run longer)
          -> select -> retrain (profiling, debugging rules, calibration, test metrics) -> deploy -> end

Run it on the embedded generated dataset with `python flows/counting_flow.py run`; point `--source` at a local
ABID-layout or class-folder directory, or at `s3://...`, for real photos. Knobs live in the `config` file
(`flows/config.json` by default; `--config config FILE` or `--config-value config JSON` replace it).
"""

from pathlib import Path

from metaflow import (Config, FlowSpec, Parameter, card, catch, config_expr, current, resources, retry, step,
                      timeout)

from counting import pipeline
from counting.checkpoints import task_checkpoint
from counting.compute import remote_compute
from counting.cards import (confusion_matrix_figure, figure, heading, learning_curves, metrics_table,
                            records_table, reliability_figure, trial_table)

CONFIG_FILE = str(Path(__file__).with_name("config.json"))
COMPUTE_DEFAULTS = pipeline.DEFAULT_SETTINGS["compute"]
TRIAL_TIMEOUT = config_expr("config.get('compute', {}).get('trial_timeout_minutes', "
                            f"{COMPUTE_DEFAULTS['trial_timeout_minutes']})")
RETRAIN_TIMEOUT = config_expr("config.get('compute', {}).get('retrain_timeout_minutes', "
                              f"{COMPUTE_DEFAULTS['retrain_timeout_minutes']})")
TRIAL_OUTPUTS = ["trial_result", "checkpoint", "trial_error"]


@remote_compute
class BinCountingFlow(FlowSpec):
    """Count objects in storage-bin photos: fetch, split, search, retrain, deploy."""

    config = Config("config", default=CONFIG_FILE, help="JSON settings: data, split, train, search, compute, deploy.")

    source = Parameter("source", default="generated",
                       help="'generated', a local ABID-layout or class-folder directory, or s3://bucket/prefix.")
    subset = Parameter("subset", default="", help="A file_list.json path or 'reference-10k' to select images.")
    min_count = Parameter("min-count", type=int, default=None, help="Smallest count kept (overrides data.min_count).")
    max_count = Parameter("max-count", type=int, default=None, help="Largest count kept (overrides data.max_count).")
    val_fraction = Parameter("val-fraction", type=float, default=None,
                             help="Share of images for validation (overrides split.val_fraction).")
    test_fraction = Parameter("test-fraction", type=float, default=None,
                              help="Share of images for the test split (overrides split.test_fraction).")
    n_trials = Parameter("n-trials", type=int, default=None,
                       help="Trials in the first search round (overrides search.trials).")
    deploy_target = Parameter("deploy-target", default=None,
                              help="'local' (loopback endpoint) or 'sagemaker' (overrides deploy.target).")
    endpoint_name = Parameter("endpoint-name", default=None, help="Endpoint name (default: flow name and run id).")
    sagemaker_role = Parameter("sagemaker-role", default=None, help="IAM role ARN the SageMaker model runs as.")
    sagemaker_bucket = Parameter("sagemaker-bucket", default=None, help="S3 bucket for the model package.")
    instance_type = Parameter("instance-type", default=None, help="SageMaker instance type, e.g. ml.m5.large.")

    @step
    def start(self):
        """Validate the settings and the search space before any work starts."""
        self.settings = pipeline.resolve_settings(self.config, {
            ("data", "min_count"): self.min_count, ("data", "max_count"): self.max_count,
            ("split", "val_fraction"): self.val_fraction, ("split", "test_fraction"): self.test_fraction,
            ("search", "trials"): self.n_trials, ("deploy", "target"): self.deploy_target,
            ("deploy", "endpoint_name"): self.endpoint_name, ("deploy", "sagemaker", "role_arn"): self.sagemaker_role,
            ("deploy", "sagemaker", "bucket"): self.sagemaker_bucket,
            ("deploy", "sagemaker", "instance_type"): self.instance_type})
        self.search_space = pipeline.search_space(self.settings)
        self.counts = pipeline.count_classes(self.settings)
        print(f"Counting {self.counts} from {self.source!r}; {self.settings['search']['trials']} trials over "
              f"{sorted(self.search_space)}")
        self.next(self.fetch)

    @step
    def fetch(self):
        """List the source's images and cut the list into shards, fetched in parallel."""
        self.listing = pipeline.list_source(self.source, self.subset or None, self.settings)
        self.shards = pipeline.shard_listing(self.listing, self.settings)
        print(f"{len(self.listing.items)} images listed, {len(self.listing.skipped)} skipped, "
              f"{len(self.shards)} shard(s)")
        self.next(self.fetch_shard, foreach="shards")

    @retry(times=2)
    @resources(cpu=4, memory=8000)
    @step
    def fetch_shard(self):
        """Download one shard concurrently and pack every image once at training size."""
        self.part = pipeline.fetch_shard(self.input, self.settings)
        self.next(self.pack)

    @card(type="blank", id="data")
    @step
    def pack(self, inputs):
        """Merge the shards into one pinned, content-addressed dataset snapshot."""
        self.dataset = pipeline.merge_shards([task.part for task in inputs], inputs[0].listing)
        self.merge_artifacts(inputs, exclude=["part"])
        self.manifest = self.dataset.manifest
        self.class_counts = self.dataset.class_counts()
        self.skipped = self.dataset.skipped
        print(f"Dataset {self.dataset.fingerprint[:12]}: {len(self.manifest)} images {self.class_counts}, "
              f"{len(self.skipped)} skipped")
        current.card.extend([
            heading(f"Dataset {self.dataset.fingerprint[:12]}"),
            metrics_table({f"count {count}": n for count, n in sorted(self.class_counts.items())}),
            heading(f"Skipped: {len(self.skipped)}"), records_table(self.skipped, ["key", "reason"], limit=200)])
        self.next(self.split)

    @step
    def split(self):
        """Stratified train/validation/test split, then plan the first search round."""
        self.split_ids = pipeline.split_dataset(self.dataset, self.settings)
        self.first_round_plan = pipeline.plan_first_round(self.search_space, self.settings)
        self.next(self.trial, foreach="first_round_plan")

    @catch(var="trial_error", print_exception=True)
    @retry(times=1)
    @timeout(minutes=TRIAL_TIMEOUT)
    @resources(gpu=1, cpu=4, memory=16000)
    @step
    def trial(self):
        """Train one candidate for the short first round."""
        self.trial_result, self.checkpoint = pipeline.run_trial(
            self.input, self.dataset, self.split_ids, self.counts, self.settings, len(self.first_round_plan),
            checkpoints=task_checkpoint(self))
        self.next(self.halve)

    @step
    def halve(self, inputs):
        """Keep the best fraction of the first round (successive halving) and ask TPE for new candidates."""
        self.first_round = pipeline.collect_trials(inputs)
        self.merge_artifacts(inputs, exclude=TRIAL_OUTPUTS)
        self.second_round_plan = pipeline.plan_second_round(self.first_round, self.search_space, self.settings)
        self.next(self.second_round)

    @step
    def second_round(self):
        """Fan out the second round: survivors continue, new candidates start."""
        for candidate in self.second_round_plan:
            origin = "continues its first-round checkpoint" if candidate["origin"] else "new (TPE)"
            print(f"Trial {candidate['trial_id']}: {candidate['params']} {origin}")
        self.next(self.extend, foreach="second_round_plan")

    @catch(var="trial_error", print_exception=True)
    @retry(times=1)
    @timeout(minutes=TRIAL_TIMEOUT)
    @resources(gpu=1, cpu=4, memory=16000)
    @step
    def extend(self):
        """Continue a surviving candidate (or train a new TPE one) to its full budget."""
        self.trial_result, self.checkpoint = pipeline.run_trial(
            self.input, self.dataset, self.split_ids, self.counts, self.settings, len(self.second_round_plan),
            checkpoints=task_checkpoint(self))
        self.next(self.select)

    @card(type="blank", id="search")
    @step
    def select(self, inputs):
        """Join the search: the table of every trial, failures with their errors, the best parameters."""
        self.merge_artifacts(inputs, exclude=TRIAL_OUTPUTS)
        self.trials = self.first_round + pipeline.collect_trials(inputs)
        self.failed_trials = [t for t in self.trials if t["status"] != "ok"]
        self.best_trial = pipeline.best_trial(self.trials)
        self.best_params = self.best_trial["params"]
        print(f"Best: trial {self.best_trial['trial_id']} {self.best_params} "
              f"val accuracy {self.best_trial['val_accuracy']:.3f}")
        current.card.extend([heading("Trials"), trial_table(self.trials),
                             heading("Learning curves"), figure(learning_curves(self.trials))])
        self.next(self.retrain)

    @card(type="blank", id="retrain")
    @retry(times=1)
    @timeout(minutes=RETRAIN_TIMEOUT)
    @resources(gpu=1, cpu=4, memory=16000)
    @step
    def retrain(self):
        """Train the best configuration again with profiling and debugging rules; calibrate; test."""
        pipeline.fail_if_requested("retrain")
        outcome = pipeline.retrain_best(self.best_params, self.dataset, self.split_ids, self.counts, self.settings,
                                        checkpoints=task_checkpoint(self))
        self.model_state, self.model_spec = outcome.model_state, outcome.model_spec
        self.history, self.profile, self.debug_report = outcome.history, outcome.profile, outcome.debug_report
        self.temperature, self.calibration = outcome.temperature, outcome.calibration
        self.test_metrics = outcome.test_metrics
        self.model_package = pipeline.package_model(outcome, self.counts, self.settings, current.pathspec)
        current.card.extend([
            heading("Test metrics"), metrics_table(self.test_metrics),
            figure(confusion_matrix_figure(self.test_metrics["confusion_matrix"], self.counts)),
            heading("Learning curve"), figure(learning_curves([{"trial_id": "retrain", "history": self.history}])),
            heading("Profile: top operators"),
            records_table(self.profile["top_operators"], list(self.profile["top_operators"][0])),
            heading("Wall time by phase (s)"), metrics_table(self.profile["phase_seconds"]),
            heading("Debugging rules"), records_table(self.debug_report, ["rule", "verdict", "detail"]),
            heading("Calibration"),
            figure(reliability_figure(self.calibration["bins_before"], self.calibration["bins_after"],
                                      self.calibration["ece_before"], self.calibration["ece_after"])),
        ])
        print(f"Test accuracy {self.test_metrics['accuracy']:.3f}, RMSE {self.test_metrics['rmse']:.3f}")
        self.next(self.deploy)

    @step
    def deploy(self):
        """Serve the model package, send it held-out test images, record answers and latencies."""
        self.endpoint = pipeline.deploy_and_probe(self.model_package, self.dataset,
                                                  self.split_ids, self.settings, current.flow_name, current.run_id)
        print(f"Endpoint {self.endpoint['name']}: {len(self.endpoint['answers'])} answers, "
              f"p50 {self.endpoint['latency_ms_p50']:.1f} ms, accuracy {self.endpoint['accuracy']:.3f}")
        self.next(self.end)

    @card(type="blank", id="summary")
    @step
    def end(self):
        """Summarise the run."""
        self.summary = pipeline.summarize(self.dataset, self.trials,
                                          self.best_params, self.test_metrics, self.endpoint)
        current.card.extend([heading("Summary"), metrics_table(self.summary),
                             heading("Confusion matrix"),
                             figure(confusion_matrix_figure(self.test_metrics["confusion_matrix"], self.counts))])
        for name, value in self.summary.items():
            print(f"{name}: {value}")


if __name__ == "__main__":
    BinCountingFlow()
