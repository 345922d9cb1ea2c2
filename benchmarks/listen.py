"""`radscan listen` receiving many instances: time and memory against a bare storage SCP (issue 24).

Makes INSTANCES copies of a real CR chest (new Study and SOP Instance UIDs, STUDY_SIZE instances a
study) and sends them with one storescu association, first to a bare pynetdicom storage SCP that
only writes each instance to disk (the floor: what receiving costs at all), then to `radscan
listen`, which also fsyncs, spools and scores them (`--no-residuals`, so that pictures do not
dominate). Prints the seconds until the last instance was acknowledged and until the last study
was scored, and the peak resident memory of each process (VmHWM), with the listener's ratios to the
floor.

    python benchmarks/listen.py --instances 500 --study-size 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "studies" / "CR0002" / "IM00001"

BARE_SCP = """
import sys
from pathlib import Path
from pynetdicom import AE, evt, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES
folder = Path(sys.argv[2])
def store(event):
    (folder / (event.request.AffectedSOPInstanceUID + ".dcm")).write_bytes(event.encoded_dataset())
    return 0
ae = AE(ae_title="RADSCAN")
for context in AllStoragePresentationContexts:
    ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
print("listening", flush=True)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, store)])
"""


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _make(folder: Path, instances: int, study_size: int) -> list[Path]:
    dataset = pydicom.dcmread(SOURCE)
    paths = []
    for index in range(instances):
        if index % study_size == 0:
            dataset.StudyInstanceUID = generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{index:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _send(port: int, folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), str(folder), "-r",
                    "-aet", "PACS", "-aec", "RADSCAN", "-cx", "-q"], check=True, timeout=3600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--study-size", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        (work_dir / "send").mkdir()
        _make(work_dir / "send", args.instances, args.study_size)
        studies = -(-args.instances // args.study_size)

        port, kept = _free_port(), work_dir / "bare"
        kept.mkdir()
        bare = subprocess.Popen([sys.executable, "-c", BARE_SCP, str(port), str(kept)], stdout=subprocess.PIPE,
                                text=True)
        bare.stdout.readline()
        floor_s = _send(port, work_dir / "send")
        floor_mb = _peak_mb(bare.pid)
        bare.terminate()
        bare.wait()

        port, out = _free_port(), work_dir / "worklist" / "report.csv"
        listener = subprocess.Popen([sys.executable, "-m", "radscan", "-q", "listen", "--port", str(port), "--out",
                                     str(out), "--quiet-seconds", "2", "--no-residuals", "--json"],
                                    stdout=subprocess.PIPE, text=True, cwd=REPO)
        time.sleep(3)  # its start-up: the model loads when the first study is scored
        start = time.perf_counter()
        received_s = _send(port, work_dir / "send")
        scored = 0
        while scored < studies:
            line = listener.stdout.readline()
            if not line:
                raise SystemExit("the listener stopped")
            scored += bool(json.loads(line).get("study"))
        scored_s = time.perf_counter() - start
        listener_mb = _peak_mb(listener.pid)
        listener.terminate()
        listener.wait(timeout=120)
    print(f"{args.instances} instances in {studies} studies, one storescu association")
    print(f"bare storage SCP (floor): received in {floor_s:6.1f} s, peak memory {floor_mb:6.0f} MB")
    print(f"radscan listen:           received in {received_s:6.1f} s ({received_s / floor_s:.2f}x the floor), all "
          f"studies scored after {scored_s:6.1f} s, peak memory {listener_mb:6.0f} MB ({listener_mb / floor_mb:.1f}x)")


if __name__ == "__main__":
    main()
