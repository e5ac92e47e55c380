import json
import os

import numpy as np
import pytest
from data_helpers import word_level_tokenizer, write_jsonl
from PIL import Image

from mqt_jax.config import DataConfig, MSampler
from mqt_jax.core import splice
from mqt_jax.data.pipeline import make_batches, read_records
from mqt_jax.data.shapes import write_shapes

ANSWERS = ["Red", "Blue", "circle", "shape", "colour", "What", "now", "And"]


def qa(i, answer, image=True, **extra):
    rec = {"id": f"good{i}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + "What colour ?"},
        {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = f"img{i}.png"
    return {**rec, **extra}


@pytest.fixture()
def folder(tmp_path):
    word_level_tokenizer(tmp_path / "tok")
    for i in range(len(ANSWERS)):
        Image.new("RGB", (20, 12), (i * 30, 100, 200)).save(tmp_path / f"img{i}.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "img0.png").read_bytes()[:40])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    return tmp_path


def config(folder, path, **kw):
    return DataConfig(data_path=str(path), image_root=str(folder), tokenizer_dir=str(folder / "tok"),
                      shuffle=False, num_epochs=1, **kw)


def batches(cfg, batch_size=2, seq_len=48, **kw):
    it = make_batches(cfg, num_queries=4, image_size=8, batch_size=batch_size, seq_len=seq_len,
                      sampler=MSampler("official"), **kw)
    return it, list(it)


def answers_in(batch_list, vocab_inverse):
    """Decoded loss-bearing words of every example (EOS dropped)."""
    seen = []
    for b in batch_list:
        for row, seg in zip(range(b["targets"].shape[0]), b["segment_ids"]):
            for s in set(seg[seg > 0].tolist()):
                sel = (seg == s) & (b["loss_mask"][row] > 0)
                words = [vocab_inverse[t] for t in b["targets"][row][sel] if vocab_inverse[t] != "</s>"]
                seen.append(" ".join(words))
    return seen


BAD = [
    qa(100, "Red") | {"image": "missing.png"},  # missing image file
    qa(101, "Red") | {"image": "truncated.png"},  # truncated image
    qa(102, "Red") | {"image": "garbage.png"},  # undecodable image
    "{this is not json",  # malformed JSON line
    {"id": "bad_role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    {"id": "no_answer", "conversations": [{"from": "human", "value": "hi"}]},
    {"id": "two_images", "image": "img0.png",
     "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]},
    {"id": "empty", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]},
    qa(103, "Red") | {"image": "/etc/hostname"},  # absolute: outside the image root
    qa(104, "Red") | {"image": "../outside.png"},  # a .. step out of the image root
    qa(105, "Red") | {"image": "link_out.png"},  # a symbolic link pointing out of the root
    qa(106, "Red") | {"image": 123},  # not a path
    qa(107, "Red") | {"image": ["img0.png", "img1.png"]},  # a list where one path is expected
    {"id": "turns_not_a_list", "image": "img0.png", "conversations": 5},
    {"id": "surrogate", "conversations": [{"from": "human", "value": "bad \ud800 text"},
                                          {"from": "gpt", "value": "x"}]},  # a lone surrogate
    {"id": "image_in_answer", "image": "img0.png", "conversations": [
        {"from": "human", "value": "What colour ?"}, {"from": "gpt", "value": "<image> Red"}]},
    qa(108, "Red") | {"image": "a_folder.png"},  # a directory
    qa(109, "Red") | {"image": "pipe.png"},  # a named pipe: reading it would wait forever
    qa(110, "Red") | {"image": "img0\x00.png"},  # a NUL byte in the path
]
REASONS = {"missing_image": 1, "bad_image": 4, "malformed_json": 2, "unknown_role": 1,
           "no_assistant_turn": 1, "too_many_placeholders": 1, "empty_text": 1, "non_utf8": 1,
           "image_outside_root": 3, "malformed_record": 4, "bad_text": 1,
           "placeholder_in_answer": 1}


def mixed_file(folder):
    """The good records with a bad one after each (the rest of BAD at the end); a symbolic
    link inside the image root that leads out of it; an image outside the root; a folder and
    a named pipe named like images."""
    Image.new("RGB", (4, 4)).save(folder.parent / "outside.png")
    (folder / "a_folder.png").mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "link_out.png").symlink_to(folder.parent / "outside.png")
    good = [qa(i, a, image=(i != 5)) for i, a in enumerate(ANSWERS)]  # record 5: text only
    lines = []
    for i, g in enumerate(good):
        lines.append(g)
        if i < len(BAD):
            lines.append(BAD[i])
    lines += BAD[len(good):]
    path = write_jsonl(folder / "data.jsonl", lines)
    path.write_bytes(path.read_bytes() + b'{"id": "latin1", "x": "\xe9t\xe9"}\n'  # not UTF-8
                     + b'{"id": "deep", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n")
    return path


def test_every_good_record_arrives_once_and_bad_ones_are_counted(folder):
    vocab = json.loads((folder / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    inverse = {i: w for w, i in vocab.items()}
    it, out = batches(config(folder, mixed_file(folder)))
    assert sorted(answers_in(out, inverse)) == sorted(ANSWERS)
    assert dict(it.skipped) == REASONS
    for b in out:
        assert set(b) == set(splice.BATCH_KEYS)
        assert b["images"].shape == (2, 1, 8, 8, 3) and b["token_ids"].shape == (2, 48)


def test_strict_mode_names_the_record_and_the_file(folder):
    path = write_jsonl(folder / "strict.jsonl", [qa(0, "Red"), BAD[0], qa(1, "Blue")])
    with pytest.raises(ValueError, match=r"record 'good100' in .*strict.jsonl: missing_image"):
        batches(config(folder, path, strict=True))


def test_json_list_and_json_lines_read_the_same(folder):
    records = [qa(i, a) for i, a in enumerate(ANSWERS)]
    (folder / "list.json").write_text(json.dumps(records))
    write_jsonl(folder / "lines.jsonl", records)
    assert read_records(str(folder / "list.json")) == read_records(str(folder / "lines.jsonl")) == records


def test_example_whose_answer_is_cut_away_is_dropped(folder):
    long_question = {"id": "long", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "What colour ? " * 20}, {"from": "gpt", "value": "Red"}]}
    path = write_jsonl(folder / "long.jsonl", [long_question, qa(1, "Blue")])
    it, out = batches(config(folder, path), batch_size=1, seq_len=80)
    assert len(out) == 1 and dict(it.skipped) == {"truncated_no_loss": 1}


def test_m_is_drawn_per_example_and_reproducibly(folder):
    path = write_jsonl(folder / "m.jsonl", [qa(i % 8, "Red") for i in range(40)])
    m1 = np.concatenate([b["m"] for b in batches(config(folder, path))[1]])
    m2 = np.concatenate([b["m"] for b in batches(config(folder, path))[1]])
    np.testing.assert_array_equal(m1, m2)
    assert set(m1.ravel().tolist()) == {2, 4}  # official sampler, M = 4


def test_packing_keeps_examples_apart(folder):
    path = write_jsonl(folder / "p.jsonl", [qa(i % 8, "Red") for i in range(12)])
    plain = dict(template="plain")  # short stage-1 examples: several fit a row
    it, out = batches(config(folder, path, pack=True, **plain), batch_size=2, seq_len=64,
                      images_per_row=4)
    b = out[0]
    assert b["segment_ids"].max() >= 2  # several examples share a row
    for row in range(2):
        segs, vis, m = b["segment_ids"][row], b["visual_index"][row], b["m"][row]
        for s in range(1, segs.max() + 1):
            slots = set((vis[(segs == s) & (vis >= 0)] // 4).tolist())
            assert len(slots) == 1  # each example gathers from its own image slot only
            slot = slots.pop()
            assert ((segs == s) & (vis >= 0)).sum() == m[slot]
    padded = np.mean(np.concatenate([x["segment_ids"] for x in out]) == 0)
    unpacked = np.mean(np.concatenate([x["segment_ids"] for x in batches(
        config(folder, path, **plain), batch_size=2, seq_len=64, images_per_row=4)[1]]) == 0)
    assert padded < unpacked


@pytest.mark.parametrize("pack", [False, True])
def test_all_scales_puts_every_copy_of_an_example_in_one_batch(folder, pack):
    """MSampler "all" (M3's rule): each example once per scale, all copies in the same batch,
    each copy seeing exactly its scale's visual tokens; nothing lost or repeated."""
    vocab = json.loads((folder / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    inverse = {i: w for w, i in vocab.items()}
    path = write_jsonl(folder / "all.jsonl", [qa(i, a) for i, a in enumerate(ANSWERS)])
    kw = dict(batch_size=5, seq_len=48) if not pack else dict(batch_size=2, seq_len=64,
                                                              images_per_row=4)
    cfg = config(folder, path, pack=pack, **({"template": "plain"} if pack else {}))
    out = list(make_batches(cfg, num_queries=4, image_size=8, sampler=MSampler(
        "all", values=(4, 1, 2, 2, 16)), **kw))
    seen = {}  # answer -> (batch number, [m of each copy])
    for number, b in enumerate(out):
        for row in range(b["segment_ids"].shape[0]):
            segs, vis = b["segment_ids"][row], b["visual_index"][row]
            for s in range(1, segs.max() + 1):
                sel = (segs == s) & (b["loss_mask"][row] > 0)
                answer = " ".join(inverse[t] for t in b["targets"][row][sel]
                                  if inverse[t] != "</s>").strip()  # plain: a newline ends it
                slot = set((vis[(segs == s) & (vis >= 0)] // 4).tolist()).pop()
                assert ((segs == s) & (vis >= 0)).sum() == b["m"][row, slot]
                batch, ms = seen.setdefault(answer, (number, []))
                assert batch == number, f"{answer}: copies in batches {batch} and {number}"
                ms.append(int(b["m"][row, slot]))
    assert sorted(seen) == sorted(ANSWERS)
    assert all(sorted(ms) == [1, 2, 4] for _, ms in seen.values()), seen
    if pack:
        assert max(b["segment_ids"].max() for b in out) >= 2  # copies share rows
    with pytest.raises(ValueError, match="at 3 scales.*batch_size=2"):
        make_batches(config(folder, path), num_queries=4, image_size=8, batch_size=2,
                     seq_len=48, sampler=MSampler("all", values=(1, 2, 4)))


@pytest.mark.parametrize("pack", [False, True])
def test_restored_iterator_yields_exactly_the_same_batches(folder, pack):
    path = write_jsonl(folder / "r.jsonl", [qa(i % 8, ANSWERS[i % 8]) for i in range(30)])
    cfg = DataConfig(**{**config(folder, path, pack=pack).__dict__, "num_epochs": None,
                        "shuffle": True})
    kw = dict(num_queries=4, image_size=8, batch_size=2, seq_len=64, images_per_row=4,
              sampler=MSampler("official"), seed=5)
    it = make_batches(cfg, **kw)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = make_batches(cfg, **kw)
    counter = resumed.skipped
    resumed.set_state(state)
    assert resumed.skipped is counter  # callers holding the counter keep seeing it
    for want in expected:
        got = next(resumed)
        for key in splice.BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["json", "tfds"])
def test_worker_processes_give_the_same_batches(tmp_path, route):
    data = write_shapes(tmp_path / "shapes", num_train=24, num_eval=1)
    source = (dict(data_path=str(data / "shapes_qa.json"), image_root=str(data / "images"))
              if route == "json" else dict(tfds_dir=str(data / "tfds"), tfds_split="qa"))
    cfg = DataConfig(tokenizer_dir=str(data / "tokenizer"), num_epochs=1, **source)
    kw = dict(num_queries=16, image_size=64, batch_size=4, seq_len=256, seed=1)
    inline = list(make_batches(cfg, **kw))
    workers = list(make_batches(DataConfig(**{**cfg.__dict__, "num_workers": 2}), **kw))
    assert len(inline) == len(workers) == 6
    for a, b in zip(inline, workers):
        for key in splice.BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_each_host_reads_its_own_disjoint_shard(folder, monkeypatch):
    import grain

    vocab = json.loads((folder / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    inverse = {i: w for w, i in vocab.items()}
    path = write_jsonl(folder / "hosts.jsonl", [qa(i, a) for i, a in enumerate(ANSWERS)])
    seen = []
    for host in range(2):
        monkeypatch.setattr(grain.sharding, "ShardByJaxProcess",
                            lambda drop_remainder, h=host: grain.sharding.ShardOptions(h, 2, drop_remainder))
        seen.append(answers_in(batches(config(folder, path))[1], inverse))
    assert len(seen[0]) == len(seen[1]) == 4
    assert sorted(seen[0] + seen[1]) == sorted(ANSWERS)  # disjoint, and together complete


def test_a_json_list_with_a_byte_order_mark_reads_the_same(folder):
    records = [qa(i, a) for i, a in enumerate(ANSWERS)]
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert read_records(str(folder / "bom.json")) == records


def test_per_batch_m_is_one_draw_per_batch_with_a_data_file(folder):
    path = write_jsonl(folder / "m.jsonl", [qa(i % 8, "Red") for i in range(40)])
    sampler = MSampler("official", per="batch")
    it = make_batches(config(folder, path), num_queries=16, image_size=8, batch_size=4,
                      seq_len=128, sampler=sampler)
    draws = [b["m"][:, 0] for b in it]
    assert all(len(set(d.tolist())) == 1 for d in draws)  # one m shared by the batch
    assert len({int(d[0]) for d in draws}) > 1  # ... drawn anew per batch
    again = make_batches(config(folder, path), num_queries=16, image_size=8, batch_size=4,
                         seq_len=128, sampler=sampler)
    assert [int(d[0]) for d in draws] == [int(b["m"][0, 0]) for b in again]


@pytest.mark.parametrize("records", [
    lambda: [qa(i, "Red") | {"image": "nowhere.png"} for i in range(3)],  # a wrong image root
    lambda: ["{broken"] * 4,  # only bad records
])
def test_no_record_giving_an_example_stops_with_counts(folder, records):
    from mqt_jax.data.pipeline import NoExamples

    path = write_jsonl(folder / "bad.jsonl", records())
    it = make_batches(DataConfig(data_path=str(path), image_root=str(folder),
                                 tokenizer_dir=str(folder / "tok")),  # repeats forever
                      num_queries=4, image_size=8, batch_size=2, seq_len=48)
    with pytest.raises(NoExamples, match=r"no record of .*bad.jsonl gives a training example "
                                         r"\(\d records on this host, \d+ skipped in a row: "
                                         r"(missing_image|malformed_json) \d+\)"):
        next(it)


def children_of(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            out.add(int(entry))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_exit_when_their_trainer_is_killed(folder):
    """num_workers = 2, the parent SIGKILLed after its first batch: no worker lives on."""
    import signal
    import subprocess
    import sys
    import time

    path = write_jsonl(folder / "data.jsonl", [qa(i, a) for i, a in enumerate(ANSWERS)] * 50)
    script = (f"from mqt_jax.data.pipeline import make_batches\nfrom mqt_jax.config import "
              f"DataConfig, MSampler\nit = make_batches(DataConfig(data_path={str(path)!r}, "
              f"image_root={str(folder)!r}, tokenizer_dir={str(folder / 'tok')!r}, num_workers=2), "
              f"num_queries=4, image_size=8, batch_size=2, seq_len=48, sampler=MSampler('official'))\n"
              f"next(iter(it))\nprint('batch', flush=True)\nimport time\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "batch"
        workers = children_of(proc.pid)
        assert len(workers) >= 2  # the grain workers (and multiprocessing's resource tracker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and "Z" not in
                                         open(f"/proc/{w}/stat").read().rsplit(")", 1)[1][:3]
                                         for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")
             and "Z" not in open(f"/proc/{w}/stat").read().rsplit(")", 1)[1][:3]]
    assert not alive, f"still running after their parent died: {alive}"
