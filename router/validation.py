"""Request validation: a parsed `GenerateRequest` → a fully resolved, frozen `ValidRequest`.

Rules, their order (the first failing rule answers) and their messages follow TGI's
`router/src/validation.rs` (`Validation::validate`, `validate_input`, `validate_best_of`) and the
stream checks of `server.rs::generate_stream_internal`:

 1. streaming: `best_of != 1` ⇒ BestOfStream; `decoder_input_details` ⇒ PrefillDetailsStream
 2. `best_of != 1`: max_best_of == 1 ⇒ BestOfDisabled; outside 1..=max_best_of ⇒ BestOf
 3. best_of > 1 without sampling ⇒ BestOfSampling
 4. temperature, repetition_penalty, frequency_penalty, [presence_penalty, min_p], top_p,
    typical_p, top_k, max_new_tokens == 0, stop count, seed with best_of > 1, top_n_tokens,
    empty inputs, truncate
 5. tokenize; input + max_new_tokens ≤ max_total_tokens (checked before the input length, as in
    TGI); input length ≤ max_input_tokens
 6. grammar

Deliberate differences from TGI (the messages of rejected values stay TGI's, word for word,
because clients and tests compare them):
- `temperature == 0` is accepted and means greedy (OpenAI convention; TGI rejects it), and so
  does any temperature below pytgi_common.sampling.MIN_TEMPERATURE (TGI's shards would divide
  into NaN). The resolved parameters are then do_sample=False with every warper neutral.
- `top_p == 1.0` is accepted and means "off" (OpenAI clients send it; TGI rejects it).
- `presence_penalty` ∈ [-2, 2] and `min_p` ∈ [0, 1] are extra knobs TGI's /generate lacks.
- `best_of == 0` is rejected with TGI's BestOf message; TGI itself lets 0 through as 1.
- `max_new_tokens` absent ⇒ `max_total_tokens - input_length` in one go. TGI schedules that in
  segments of 1024 tokens and checks `input + min(that, 1024)`; without segments the two are the
  same check because the absent value always fits exactly.
- `grammar` is compile-checked here (router/grammar/validator.py: size and repetition limits, a real
  compile off the event loop within a timeout, cached by hash) and enforced by the shards; with
  `--disable-grammar-support` (or shards without grammar support) it is rejected, "grammar is
  not supported", never silently ignored. A `json` schema need not have `properties` (TGI
  requires it); failures read "grammar is not valid: <reason>".
- `adapter_id` names a LoRA adapter the shards loaded (router/adapters.py: the base model's id,
  `tgi` or nothing mean none); an unknown one is a 422 here, never a shard error. Checked after
  the rules of step 4 and before tokenizing (TGI has no router-side check to order it against).
- Stop sequences are matched on the generated text (router side), not token ids; each is at most
  MAX_STOP_CHARS characters long (router/bounds.py): every token is matched against all of them.

`ValidParameters.do_sample` is the *effective* choice (pytgi_common/sampling.py `is_greedy`, the
rule the shards apply too), so the router knows whether to report a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytgi_common.grammar import GrammarError
from pytgi_common.sampling import argmax_temperature, is_greedy
from router import bounds
from router.adapters import Adapters
from router.errors import ContextLengthError, ValidationError
from router.grammar.native import native_grammar
from router.grammar.validator import GrammarNotSupported, GrammarValidator
from router.limits import Limits
from router.schemas import GenerateParameters, GenerateRequest
from router.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ValidParameters:
    temperature: float  # 1.0 when greedy
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    typical_p: float  # 1.0: off
    min_p: float  # 0.0: off
    do_sample: bool  # effective: sample (True) or argmax (False)
    seed: int | None  # None: Infer draws one per generation when sampling (and reports it)
    repetition_penalty: float  # 1.0: off
    frequency_penalty: float  # 0.0: off
    presence_penalty: float  # 0.0: off
    watermark: bool
    max_new_tokens: int
    stop: tuple[str, ...]
    return_full_text: bool
    details: bool  # details or decoder_input_details
    decoder_input_details: bool
    top_n_tokens: int
    best_of: int
    # Set by the OpenAI layer (TGI's native API has no such fields; defaults keep TGI behaviour).
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    include_stop: bool = True  # TGI keeps the stop text in the output; OpenAI strips it
    skip_special_tokens: bool = False  # per-token text: TGI shows "<|im_end|>"; OpenAI content doesn't
    # Constrained decoding (router/grammar/native.py, router/openai/constraints.py): pb.GrammarType and its text; 0 / "" = none.
    grammar_type: int = 0
    grammar: str = ""


@dataclass(frozen=True, slots=True)
class ValidRequest:
    input_ids: tuple[int, ...]  # after truncation: what the shards compute
    input_text: str  # the request's `inputs`, untruncated (for return_full_text)
    input_length: int
    truncated: bool  # `truncate` dropped tokens from the left
    parameters: ValidParameters
    adapter_id: str = ""  # a loaded LoRA adapter's id; "": the base model


def _check(ok: bool, message: str, param: str | None = None) -> None:
    if not ok:
        raise ValidationError(message, param=param)


class Validator:
    def __init__(self, tokenizer: Tokenizer, limits: Limits, grammar: GrammarValidator | None = None,
                 adapters: Adapters | None = None) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.grammar = grammar or GrammarValidator(tokenizer)
        self.adapters = adapters or Adapters(base_model_id="")

    def check_stop(self, stop) -> tuple[str, ...]:
        """How many stop sequences, and how long: the one rule for both APIs (and /chat_tokenize)."""
        stop = tuple(stop)
        _check(len(stop) <= self.limits.max_stop_sequences,
               f"`stop` supports up to {self.limits.max_stop_sequences} stop sequences. Given: {len(stop)}", "stop")
        longest = max(map(len, stop), default=0)
        _check(longest <= bounds.MAX_STOP_CHARS,
               f"a stop sequence must be at most {bounds.MAX_STOP_CHARS} characters long. Given: {longest}", "stop")
        return stop

    def refuse_certainly_too_long(self, inputs: str, max_new_tokens: int | None = None) -> None:
        """Refuse without tokenizing an input that cannot fit whatever its exact token count:
        tokenization work per request is then bounded by the model's context, not by
        --payload-limit. (With `truncate`, any length is valid and the text must be tokenized.)
        /tokenize and /chat_tokenize apply it too: they tokenize prompts, not arbitrary documents."""
        limit = self.limits.max_total_tokens
        at_least = self.tokenizer.min_num_tokens(inputs)
        if at_least > limit:
            max_new_tokens = max_new_tokens or 0
            raise ContextLengthError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limit}. "
                f"Given: at least {at_least} `inputs` tokens and {max_new_tokens} `max_new_tokens`",
                input_length=at_least, max_new_tokens=max_new_tokens, limit=limit, kind="total")

    async def validate(self, request: GenerateRequest) -> ValidRequest:
        limits = self.limits
        p: GenerateParameters = request.parameters
        best_of = 1 if p.best_of is None else p.best_of

        if request.stream:
            _check(best_of == 1, "`best_of` != 1 is not supported when streaming tokens")
            _check(not p.decoder_input_details,
                   "`decoder_input_details` == true is not supported when streaming tokens")
        if best_of != 1:
            _check(limits.max_best_of != 1, "`best_of` != 1 is not allowed for this endpoint")
            _check(0 < best_of <= limits.max_best_of,
                   f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")

        # A vanishing temperature means argmax (pytgi_common/sampling.py), whatever else is set.
        greedy_by_temperature = p.temperature is not None and argmax_temperature(p.temperature)
        # TGI's rule: sampling was asked for if do_sample or any warper field is present.
        sampling_requested = not greedy_by_temperature and (
            p.do_sample or p.temperature is not None or p.top_k is not None or p.top_p is not None
            or p.typical_p is not None or p.min_p is not None
        )
        _check(not (best_of > 1 and not sampling_requested), "you must use sampling when `best_of` is > 1")

        temperature = 1.0 if p.temperature is None else p.temperature
        _check(temperature >= 0.0, "`temperature` must be strictly positive")

        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        _check(repetition_penalty > 0.0, "`repetition_penalty` must be strictly positive")

        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        _check(-2.0 <= frequency_penalty <= 2.0, "`frequency_penalty` must be >= -2.0 and <= 2.0")

        presence_penalty = 0.0 if p.presence_penalty is None else p.presence_penalty
        _check(-2.0 <= presence_penalty <= 2.0, "`presence_penalty` must be >= -2.0 and <= 2.0")

        min_p = 0.0 if p.min_p is None else p.min_p
        _check(0.0 <= min_p <= 1.0, "`min_p` must be >= 0.0 and <= 1.0")

        top_p = 1.0 if p.top_p is None else p.top_p
        _check(0.0 < top_p <= 1.0, "`top_p` must be > 0.0 and < 1.0")

        typical_p = 1.0 if p.typical_p is None else p.typical_p
        _check(p.typical_p is None or 0.0 < typical_p < 1.0, "`typical_p` must be > 0.0 and < 1.0")

        top_k = 0 if p.top_k is None else p.top_k
        _check(p.top_k is None or top_k > 0, "`top_k` must be strictly positive")

        _check(p.max_new_tokens != 0, "`max_new_tokens` must be strictly positive")

        stop = self.check_stop(p.stop)

        _check(p.seed is None or best_of <= 1, "`seed` must not be set when `best_of` > 1")

        top_n_tokens = 0 if p.top_n_tokens is None else p.top_n_tokens
        _check(top_n_tokens <= limits.max_top_n_tokens,
               f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n_tokens}")

        _check(len(request.inputs) > 0, "`inputs` cannot be empty")

        truncate = p.truncate
        _check(truncate is None or 0 < truncate <= limits.max_input_tokens,
               f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. Given: {truncate}")

        adapter_id = self.adapters.resolve(p.adapter_id)
        _check(adapter_id is not None, f"`adapter_id`: {self.adapters.unknown(p.adapter_id or '')}", "adapter_id")

        if request.input_ids is not None:
            ids = list(request.input_ids)  # already tokens (OpenAI completions' token-id prompts)
        else:
            if truncate is None:
                self.refuse_certainly_too_long(request.inputs, p.max_new_tokens)
            try:
                ids = await self.tokenizer.aencode(request.inputs, request.add_special_tokens)
            except Exception as error:  # the Rust tokenizer's failures surface as exceptions
                raise ValidationError(f"tokenizer error {error}") from error
        input_length = len(ids) if truncate is None else min(len(ids), truncate)

        if p.max_new_tokens is None:
            max_new_tokens = max(limits.max_total_tokens - input_length, 0)
        else:
            max_new_tokens = p.max_new_tokens
        if input_length + max_new_tokens > limits.max_total_tokens:
            raise ContextLengthError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`",
                input_length=input_length, max_new_tokens=max_new_tokens, limit=limits.max_total_tokens,
                kind="total")
        if input_length > limits.max_input_tokens:
            raise ContextLengthError(
                f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}",
                input_length=input_length, max_new_tokens=max_new_tokens, limit=limits.max_input_tokens,
                kind="input")

        grammar_type, grammar = 0, ""
        if p.grammar is not None:
            try:
                grammar_type, grammar = native_grammar(p.grammar.type, p.grammar.value)
                await self.grammar.check(grammar_type, grammar, "grammar")
            except GrammarNotSupported as error:
                raise ValidationError("grammar is not supported") from error
            except GrammarError as error:
                raise ValidationError(f"grammar is not valid: {error.message}") from error

        do_sample = not is_greedy(do_sample=p.do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  typical_p=typical_p, min_p=min_p)
        if greedy_by_temperature:  # the warpers are off: no shard can sample this request
            temperature, top_k, top_p, typical_p, min_p = 1.0, 0, 1.0, 1.0, 0.0

        parameters = ValidParameters(
            temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p, min_p=min_p,
            do_sample=do_sample, seed=p.seed, repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            watermark=p.watermark, max_new_tokens=max_new_tokens, stop=stop,
            return_full_text=bool(p.return_full_text),
            details=p.details or p.decoder_input_details,
            decoder_input_details=p.decoder_input_details,
            top_n_tokens=top_n_tokens, best_of=best_of, grammar_type=grammar_type, grammar=grammar,
        )
        kept = tuple(ids[len(ids) - input_length:])
        return ValidRequest(
            input_ids=kept, input_text=request.inputs, input_length=input_length,
            truncated=input_length < len(ids), parameters=parameters, adapter_id=adapter_id,
        )

