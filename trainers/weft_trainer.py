"""Helpers for writing a weft trainer: read the job, read and write safetensors, write metrics.

A weft node runs a trainer as `sh -c COMMAND` with WEFT_JOB naming the round's job.json
(docs/trainer/job.schema.json). The trainer writes the weights the job asks for (every tensor of
the base for a `full_weights` job, every adapter factor for an `adapter` job) as f32 safetensors
to job["output"]["weights"], and metrics.json (docs/trainer/metrics.schema.json) to
job["output"]["metrics"], then exits 0. The node checks everything itself.

Pure Python (the standard library); numpy is used when it is installed, for arrays, and is not
needed otherwise. Copy this file next to your trainer or put trainers/ on PYTHONPATH.
"""

import array
import json
import math
import os
import struct
import sys

try:
    import numpy
except ImportError:  # the helpers work without it, on (shape, array('f')) pairs
    numpy = None

JOB_VERSION = 1
MASK64 = (1 << 64) - 1


class JobError(Exception):
    """A job or a file the trainer was given is not what the contract says."""


def load_job(path=None):
    """The job as a dict, from `path` or $WEFT_JOB; checks the contract's version."""
    path = path or os.environ.get("WEFT_JOB")
    if not path:
        raise JobError("WEFT_JOB is not set: a weft node runs its trainer with WEFT_JOB=.../job.json")
    with open(path, "rb") as f:
        job = json.load(f)
    if job.get("weft_job") != JOB_VERSION:
        raise JobError(f"{path}: weft_job is {job.get('weft_job')!r}, this helper reads version {JOB_VERSION}")
    return job


def read_safetensors(path):
    """{name: tensor} from an f32 safetensors file: numpy arrays of the stored shape when numpy
    is installed, else (shape, array('f')) pairs."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise JobError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise JobError(f"{path}: the header runs past the end of the file")
    header = json.loads(raw[8:8 + n])
    body = memoryview(raw)[8 + n:]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") != "F32":
            raise JobError(f"{path}: tensor {name} is {meta.get('dtype')}, weft writes F32")
        shape = [int(d) for d in meta["shape"]]
        start, end = meta["data_offsets"]
        count = math.prod(shape)
        if end - start != 4 * count or end > len(body):
            raise JobError(f"{path}: tensor {name}'s bytes do not match its shape {shape}")
        if numpy is not None:
            tensors[name] = numpy.frombuffer(body[start:end], dtype="<f4").reshape(shape).copy()
        else:
            values = array.array("f")
            values.frombytes(body[start:end])
            if sys.byteorder != "little":
                values.byteswap()
            tensors[name] = (shape, values)
    return tensors


def write_safetensors(path, tensors):
    """Writes {name: tensor} as f32 safetensors; a tensor is a numpy array (or anything with
    `.shape` and `.astype`, such as a detached torch tensor's `.numpy()`), or a (shape, values)
    pair. Written whole to a temporary file first, then renamed."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if isinstance(tensor, tuple):
            shape, values = tensor
            data = array.array("f", values)
            if sys.byteorder != "little":
                data.byteswap()
            data = data.tobytes()
        else:
            shape = list(tensor.shape)
            data = tensor.astype("<f4", copy=False).tobytes(order="C")
        shape = [int(d) for d in shape]
        if len(data) != 4 * math.prod(shape):
            raise JobError(f"tensor {name}: {len(data) // 4} values for shape {shape}")
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in chunks:
            f.write(data)
    os.replace(tmp, path)


def write_metrics(job, steps, tokens, train_loss, final_train_loss=None, validation_loss_before=None,
                  validation_loss_after=None):
    """Writes metrics.json for `job`: what the trainer declares (the coordinator measures every
    contribution itself; these are recorded, never used for weights)."""
    metrics = {"base_hash": job["base"]["hash"], "steps": int(steps), "tokens": int(tokens),
               "train_loss": float(train_loss)}
    for key, value in (("final_train_loss", final_train_loss), ("validation_loss_before", validation_loss_before),
                       ("validation_loss_after", validation_loss_after)):
        if value is not None:
            metrics[key] = float(value)
    with open(job["output"]["metrics"], "w") as f:
        json.dump(metrics, f, indent=2)


class SplitMix64:
    """weft's generator (Steele, Lea, Flood 2014), bit for bit: a trainer that draws its windows
    with it from the job's seed draws the windows weft's built-in trainer draws."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n):
        """Uniform in range(n), unbiased (rejection), as weft draws it."""
        zone = MASK64 - (MASK64 % n)
        while True:
            x = self.next_u64()
            if x < zone:
                return x % n
