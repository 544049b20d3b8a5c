"""One process of tests/test_lm_eval_dp.py, started by ``accelerate launch``: runs ``hf-posenc eval`` with the
arguments after REPORT_DIR and writes REPORT_DIR/rank<r>.json: lm-eval's rank and world size as the model reports
them, and the (task, doc id) of every request each request type handed to the model on this process."""

import json
import os
import sys
from pathlib import Path

from hf_posenc.cli import main
from hf_posenc.integrations.lm_eval_model import HFPosencLM

REQUEST_TYPES = ("loglikelihood_rolling", "generate_until")


def record_requests(report: dict, request_type: str) -> None:
    """Wrap ``HFPosencLM.<request_type>`` to note, in ``report``, which docs it is asked to score."""
    original = getattr(HFPosencLM, request_type)

    def recorded(self, requests, disable_tqdm: bool = False):
        report.update(rank=self.rank, world_size=self.world_size)
        report[request_type] = [[request.task_name, request.doc_id] for request in requests]
        return original(self, requests, disable_tqdm=disable_tqdm)

    setattr(HFPosencLM, request_type, recorded)


if __name__ == "__main__":
    report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    report: dict = {}
    for request_type in REQUEST_TYPES:
        record_requests(report, request_type)
    code = main(["eval", *argv])
    (report_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))  # one file per process
    sys.exit(code)
