"""Edit facts of your own into a model, see what it says before and after, and keep the edited model.

    python experiments/edit.py --model_name smollm2-135m --alg_name ECE_WI \\
        --subject "The Eiffel Tower" --prompt "{} is located in the city of" --target_new Rome \\
        --generate "The Eiffel Tower is in" --save_dir /tmp/edited

Requests come from flags (one request) or from ``--requests FILE``: a JSON list or JSONL, one object per
fact, ``{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
"target_true": "Paris"}`` (``target_true`` optional; MEMIT's ``{"str": ...}`` targets are accepted too).
Every request is checked before the model is loaded. For each request the script prints the probability
of the new target (and of ``target_true`` when given) and the most probable next token, before and after
the edit, and with ``--generate`` greedy continuations of the given prompts before and after.

``--save_dir DIR`` writes the edited model with ``save_pretrained`` (safetensors), its tokenizer and
``edit_manifest.json`` (requests, algorithm, effective hparams, base model, date, versions, per-request
results); ``transformers`` loads the folder directly and ``--model_name DIR`` edits it further. The folder
appears only when complete; an earlier edited model there is replaced.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing.api import (DEFAULT_ALGORITHM, Editor, base_model_name, check_save_dir,  # noqa: E402
                         resolve_hparams, save_edited_model)
from editing.requests import check_requests, read_requests_file  # noqa: E402
from experiments.algorithms import algorithm_names, get_algorithm  # noqa: E402
from util.cli import run_script, script_parser, setup_logging  # noqa: E402
from util.generate import generate_texts  # noqa: E402
from util.hparams import parse_overrides  # noqa: E402
from util.models import load_model_and_tokenizer  # noqa: E402

FLAG_FIELDS = ("subject", "prompt", "target_new", "target_true")


def parse_args(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--alg_name", default=DEFAULT_ALGORITHM, help=f"one of {', '.join(algorithm_names())}")
    parser.add_argument("--hparams_fname", default=None,
                        help="file in hparams/<ALG>/ or a path (default: the shipped <model>.json there)")
    parser.add_argument("--hparams", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override hparams values, e.g. --hparams v_num_grad_steps=40 (JSON values, else strings)")
    parser.add_argument("--requests", default=None, metavar="FILE", help="JSON list or JSONL of requests")
    parser.add_argument("--subject", default=None, help='the entity whose fact changes, e.g. "The Eiffel Tower"')
    parser.add_argument("--prompt", default=None, help='the sentence start, "{}" where the subject goes')
    parser.add_argument("--target_new", default=None, help="the new object, e.g. Rome")
    parser.add_argument("--target_true", default=None, help="the object the model knows now (optional)")
    parser.add_argument("--generate", nargs="+", default=[], metavar="PROMPT",
                        help="prompts to continue greedily before and after the edit")
    parser.add_argument("--max_new_tokens", type=int, default=20, help="tokens generated per --generate prompt")
    parser.add_argument("--save_dir", default=None, help="write the edited model, tokenizer and manifest here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    given = [f"--{key}" for key in FLAG_FIELDS if getattr(args, key) is not None]
    if args.requests and given:
        parser.error(f"give the requests either in --requests or with flags, not both ({', '.join(given)})")
    if not args.requests:
        missing = [f"--{key}" for key in FLAG_FIELDS[:3] if getattr(args, key) is None]
        if missing:
            parser.error(f"missing {', '.join(missing)}: one request needs --subject, --prompt and --target_new "
                         "(or give --requests FILE)")
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    return args


def flag_request(args) -> dict:
    return {key: getattr(args, key) for key in FLAG_FIELDS if getattr(args, key) is not None}


def one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def print_results(result, generations) -> None:
    print(f"{result.algorithm}: {len(result.requests)} request(s) edited in {result.seconds:.1f} s")
    for i, r in enumerate(result.requests):
        print(f"\n[{i}] {r.request['prompt'].format(r.subject)} ...")
        targets = [("new ", r.request["target_new"]["str"], r.before.new, r.after.new)]
        if r.before.true is not None:
            targets.append(("true", r.request["target_true"]["str"], r.before.true, r.after.true))
        for label, text, before, after in targets:
            print(f"    {label} {' ' + text.strip()!r:<24} p = {before:.4f} -> {after:.4f}")
        print(f"    top  {r.before.top_token!r} ({r.before.top_probability:.2f}) -> "
              f"{r.after.top_token!r} ({r.after.top_probability:.2f})")
        loop = f"{r.steps} steps" if r.steps is not None else "steps not reported"
        print(f"    target loop: {loop}" + (f", final loss {r.loss:.4f}" if r.loss is not None else ""))
    for prompt, before, after in generations:
        print(f"\n{prompt!r} (greedy)")
        print(f"    before: {one_line(before)}")
        print(f"    after:  {one_line(after)}")


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    # Everything that can be checked without the model is checked before loading it.
    raw = read_requests_file(args.requests) if args.requests else [flag_request(args)]
    check_requests(raw)
    overrides = parse_overrides(args.hparams)
    resolve_hparams(get_algorithm(args.alg_name), args.hparams_fname, overrides, base_model_name(args.model_name))
    if args.save_dir:
        check_save_dir(args.save_dir)

    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype)
    editor = Editor(model, tok, args.alg_name, args.hparams_fname, overrides, model_name=args.model_name,
                    seed=args.seed, data_dir=args.data_dir)
    requests = editor.check(raw)
    before = generate_texts(model, tok, args.generate, args.max_new_tokens) if args.generate else []
    result = editor.edit(requests, last=True)
    after = generate_texts(model, tok, args.generate, args.max_new_tokens) if args.generate else []
    print_results(result, list(zip(args.generate, before, after)))
    if args.save_dir:
        saved = save_edited_model(args.save_dir, editor, [result])
        print(f"\nsaved the edited model in {saved} (AutoModelForCausalLM.from_pretrained, or --model_name {saved})")
    return result


def cli(argv=None) -> int:
    return run_script(main, argv, "interrupted: nothing was saved")


if __name__ == "__main__":
    sys.exit(cli())
