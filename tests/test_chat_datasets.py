import gzip
import json

import pytest

from gptrain.chat.datasets import clean, hh_transcript, load_conversations, oasst_paths, read_conversations
from gptrain.errors import GptrainError


def alternates(conv):
    roles = [m["role"] for m in conv]
    return roles[0] == "user" and roles[-1] == "assistant" and all(
        r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))


def test_openassistant_trees_real_file(shared_data):
    path = shared_data / "sft" / "oasst_en_100_tree.jsonl"
    trees = [json.loads(line) for line in path.read_text().splitlines()]
    convs = load_conversations(str(path))
    assert len(convs) >= len(trees) and all(alternates(c) for c in convs)
    # the first tree is a prompt with three ranked answers and no follow-ups: one conversation, the rank-0 answer
    root = trees[0]["prompt"]
    best = next(r for r in root["replies"] if r["rank"] == 0)
    assert convs[0] == [{"role": "user", "content": root["text"].strip()},
                        {"role": "assistant", "content": best["text"].strip()}]
    # every ranked assistant message taken is the best-ranked among its siblings
    is_best = {}

    def index(node):
        ranks = [r["rank"] for r in node["replies"] if r["role"] == "assistant" and r.get("rank") is not None]
        for r in node["replies"]:
            if r["role"] == "assistant" and r.get("rank") is not None:
                is_best[r["text"].strip()] = r["rank"] == min(ranks)
            index(r)

    for t in trees:
        index(t["prompt"])
    taken = [m["content"] for c in convs for m in c if m["role"] == "assistant" and m["content"] in is_best]
    assert taken and all(is_best[t] for t in taken)


def test_oasst_paths_branch_on_follow_ups_and_take_best_answer():
    def msg(role, text, replies=(), rank=None, deleted=False):
        return {"role": role, "text": text, "replies": list(replies), "rank": rank, "deleted": deleted}
    tree = msg("prompter", "Q", [
        msg("assistant", "worse", rank=1, replies=[msg("prompter", "never followed")]),
        msg("assistant", "best", rank=0, replies=[
            msg("prompter", "follow-up 1", [msg("assistant", "A1")]),
            msg("prompter", "follow-up 2 (unanswered)"),
            msg("prompter", "deleted one", [msg("assistant", "gone")], deleted=True),
            msg("prompter", "follow-up 3", [msg("assistant", "A3b", rank=1), msg("assistant", "A3a", rank=0)]),
        ]),
    ])
    got = [[m["content"] for m in p] for p in oasst_paths(tree)]
    assert got == [["Q", "best", "follow-up 1", "A1"],
                   ["Q", "best", "follow-up 3", "A3a"]]
    leaf = msg("prompter", "Q", [msg("assistant", "only")])
    assert [[m["content"] for m in p] for p in oasst_paths(leaf)] == [["Q", "only"]]


def test_human_assistant_transcripts_real_file(shared_data):
    path = shared_data / "sft" / "hh-rlhf_harmless-base_test.jsonl.gz"
    with gzip.open(path, "rt") as f:
        first = json.loads(f.readline())["chosen"]
    read = read_conversations(str(path))
    convs = read.conversations
    # 2,312 records; the three whose only reply is empty are skipped, and counted
    assert (len(convs), read.records, read.skipped) == (2309, 2312, 3)
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in convs)
    assert all(m["content"] and m["content"] == m["content"].strip() for c in convs for m in c)
    assert convs[0][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert convs[0][-1]["content"] == first.rsplit("\n\nAssistant:", 1)[1].strip()
    assert len(load_conversations(str(path), limit=7)) == 7


def test_records_without_an_assistant_reply_are_counted(tmp_path):
    """Records that give no conversation (an empty final Assistant turn, an unanswered tree) are counted, not lost."""
    path = tmp_path / "hh.jsonl.gz"
    chosen = ["\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: anyone?\n\nAssistant:",
              "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "\n\nHuman: still?\n\nAssistant:  "]
    records = [{"chosen": c, "rejected": ""} for c in chosen]
    records.append({"prompt": {"role": "prompter", "text": "unanswered tree", "replies": []}})
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    read = read_conversations(str(path))
    assert [c[-1]["content"] for c in read.conversations] == ["hello", "d"]
    assert (read.records, read.skipped) == (5, 3)
    limited = read_conversations(str(path), limit=1)  # reading stops at the limit: the counts are of what was read
    assert (len(limited.conversations), limited.records, limited.skipped) == (1, 1, 0)
    assert load_conversations(str(path)) == read.conversations


def test_transcript_edge_cases():
    assert hh_transcript("\n\nHuman: hi\n\nAssistant: yo") == [{"role": "user", "content": " hi"},
                                                                {"role": "assistant", "content": " yo"}]
    # consecutive turns of one speaker are joined, an empty final reply and the question before it are dropped
    conv = clean(hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant: "))
    assert conv == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"}]
    with pytest.raises(GptrainError, match="must start with"):
        hh_transcript("Human: no leading blank line")


def test_openai_messages_jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "unanswered"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_conversations(str(path)) == [rows[0]["messages"]]
    as_json = tmp_path / "chats.json"  # a JSON array of the same records
    as_json.write_text(json.dumps(rows))
    assert load_conversations(str(as_json)) == [rows[0]["messages"]]


@pytest.mark.parametrize("content, words", [
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]\n', "line 1: invalid JSON"),
    ('{"text": "just text"}\n', "unknown conversation layout"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "no usable conversation"),
])
def test_bad_files_are_clear_errors(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(GptrainError, match="bad.jsonl") as e:
        load_conversations(str(path))
    assert words in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GptrainError, match="does not exist"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    with pytest.raises(GptrainError, match="hf:"):
        load_conversations(str(tmp_path))


def test_hf_datasets_path_with_local_parquet_and_jsonl(tmp_path):
    """`hf:` goes through datasets.load_dataset, here on local data directories (the hub is offline)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(5)]
    pq_dir = tmp_path / "pq"
    (pq_dir / "data").mkdir(parents=True)
    pq.write_table(pa.table({"messages": convs, "id": list(range(5))}), pq_dir / "data" / "train-00000.parquet")
    assert load_conversations(f"hf:{pq_dir}") == convs
    assert load_conversations(str(pq_dir / "data" / "train-00000.parquet")) == convs
    js_dir = tmp_path / "js"
    js_dir.mkdir()
    (js_dir / "test.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in convs))
    assert load_conversations(f"hf:{js_dir}", split="test", limit=2) == convs[:2]
    with pytest.raises(GptrainError, match="split 'validation'"):
        load_conversations(f"hf:{js_dir}", split="validation")
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y"}))
    with pytest.raises(GptrainError, match="no 'messages' column"):
        load_conversations(f"hf:{other}")
