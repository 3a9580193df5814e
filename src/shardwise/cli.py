"""The shardwise command line (one Typer app)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from shardwise.errors import ShardwiseError
from shardwise.model.registry import DEFAULT_MODEL

app = typer.Typer(
    help="shardwise: predict, plan and run LLM inference across heterogeneous devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """shardwise: predict, plan and run LLM inference across heterogeneous devices."""


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


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
    address: Annotated[str | None, typer.Option(help="Join a running Ray cluster ('auto' or host:port).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16; default: the device's best.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Generate a reply and stream it to the terminal."""
    try:
        from shardwise.engine.llm import LLM
        from shardwise.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        llm = LLM(model, stages=stages, plan=plan, address=address, device=device, dtype=dtype, threads=threads)
        request = prompt if no_chat else [{"role": "user", "content": prompt}]
        try:
            for piece, output in llm.stream_outputs(request, params):  # noqa: B007 (used after the loop)
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            llm.close()
        _print_stats(output)
    except ShardwiseError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")


def _print_stats(output) -> None:
    rate = output.decode_tokens_per_s
    typer.secho(
        f"\n[{len(output.prompt_token_ids)} prompt tokens, {len(output.token_ids)} generated, "
        f"TTFT {output.ttft * 1000:.0f} ms, {rate or 0:.1f} tokens/s]",
        err=True, dim=True,
    )


if __name__ == "__main__":
    app()
