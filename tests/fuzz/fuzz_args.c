/*
 * fuzz_args.c -- libFuzzer harness: the command line, parse_args() and parse_ids() of
 * phi2.c (included below).
 *
 *   make fuzz                          all harnesses (tests/fuzz/run.sh)
 *   build/fuzz/fuzz_args CRASH_FILE    replay one input
 *
 * Input: the arguments after argv[0], separated by NUL bytes. parse_args() either returns
 * or fails through die(), which under PHI2_FUZZ calls phi2_fuzz_on_error(): that jumps
 * back here. What a returned Options promises is checked: a model path, at most one prompt
 * source, every number inside its documented range, every string one of the arguments.
 * Then the last argument goes through parse_ids() (as --ids would), with a vocabulary size
 * taken from the input's length: every id returned must be below it.
 *
 * parse_ids() allocates before it may fail. In the engine die() exits, so that is no leak,
 * but here the longjmp would strand the buffer: allocation hooks record what is allocated
 * while parse_ids runs, and whatever is still live after a failure is freed.
 * die() messages go to stderr, hidden by run.sh's -close_fd_mask=2.
 * Seeds: tests/fuzz/corpus/args/ (make_seeds.py).
 */
#define PHI2_FUZZ
/* parse_args() sits in the PHI2_NO_MAIN part of phi2.c, so the whole file is included and
 * its main() renamed out of libFuzzer's way. */
#define main phi2_main
#pragma GCC diagnostic ignored "-Wunused-function"  // the engine's parts this harness does not use
#include "../../phi2.c"
#undef main

#include <sanitizer/allocator_interface.h>
#include <setjmp.h>

static jmp_buf g_on_error;

void phi2_fuzz_on_error(void) { longjmp(g_on_error, 1); }

/* Live allocations made while g_tracking is set (parse_ids allocates one buffer and grows
 * it, so a few slots suffice; more would be a finding in itself). */
static const volatile void *g_live[8];
static volatile int g_tracking;

static void on_malloc(const volatile void *p, size_t n) {
    (void)n;
    if (!g_tracking) return;
    for (int i = 0; i < 8; i++)
        if (!g_live[i]) {
            g_live[i] = p;
            return;
        }
    abort();  // parse_ids holding more than 8 buffers at once
}

static void on_free(const volatile void *p) {
    if (!g_tracking) return;
    for (int i = 0; i < 8; i++)
        if (g_live[i] == p) g_live[i] = NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    __sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
    return 0;
}

#include "finding.h"

/* s must be NULL or one of argv[1..argc). */
static void check_arg(const char *s, int argc, char **argv, const char *what) {
    if (!s) return;
    for (int i = 1; i < argc; i++)
        if (s == argv[i]) return;
    finding("fuzz_args: %s", what);
}

static void check_options(const Options *o, int argc, char **argv) {
    if (o->help || o->version) return;  // -h and -v return at once: the rest is unset
    if (!o->model_path) finding("no model path");
    check_arg(o->model_path, argc, argv, "model path is not an argument");
    check_arg(o->prompt, argc, argv, "prompt is not an argument");
    check_arg(o->prompt_file, argc, argv, "prompt file is not an argument");
    check_arg(o->ids, argc, argv, "ids are not an argument");
    check_arg(o->dump_logits, argc, argv, "dump path is not an argument");
    if (o->n_stops < 0 || o->n_stops > MAX_STOP_STRINGS) finding("--stop count out of range");
    for (int i = 0; i < o->n_stops && i < MAX_STOP_STRINGS; i++) {
        check_arg(o->stops[i], argc, argv, "stop string is not an argument");
        if (!o->stops[i][0]) finding("empty stop string");
    }
    if ((o->prompt != NULL) + (o->prompt_file != NULL) + (o->ids != NULL) > 1) finding("two prompts");
    if (!(o->min_p >= 0.0f && o->min_p <= 1.0f)) finding("--min-p out of range");
    if (!(o->penalties.repeat > 0.0f) || o->penalties.last_n < -1) finding("--repeat-penalty or --repeat-last-n out of range");
    if (o->kv_type != -1 && o->kv_type != KV_F32 && o->kv_type != KV_F16) finding("--kv-type not a type");
    if (o->use_mmap < -1 || o->use_mmap > 1) finding("--mmap / --no-mmap not -1, 0 or 1");
    if (o->n_predict < -1 || o->n_predict > INT_MAX) finding("-n out of range");
    if (!(o->temperature >= 0.0f && o->temperature <= 100.0f)) finding("--temp out of range");
    if (!(o->top_p > 0.0f && o->top_p <= 1.0f)) finding("--top-p out of range");
    if (o->top_k < 0) finding("--top-k negative");
    if (o->ctx < 0 || o->batch < 1 || o->batch > 4096 || o->n_threads < 0 || o->n_threads > 1024)
        finding("-c, -b or -t out of range");
    if (o->format < 0 || o->format >= N_TURN_FORMATS) finding("--format not a format");
    check_arg(o->system, argc, argv, "--system is not an argument");
    if ((o->format_name || o->system || o->verbose) && !o->interactive) finding("--format, --system or --verbose without -i");
    if (o->interactive && (o->ids || o->perplexity || o->dump_logits || o->trace || o->tokenize))
        finding("-i with --ids, --perplexity, --dump-logits, --trace or --tokenize");
    if (o->interactive && o->prompt_file && !strcmp(o->prompt_file, "-")) finding("-i with -f -");
    if (o->system && o->prompt != o->system) finding("--system is not the prefix");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    // Split on NUL into argv[1..]; argv[0] is the program name. Copies, so that every
    // argument is its own allocation and ASan sees a read past any one of them.
    int argc = 1;
    for (size_t i = 0; i < size; i++) argc += data[i] == 0;
    argc += 1;  // the last argument needs no terminating NUL
    char **argv = calloc((size_t)argc + 1, sizeof(char *));
    argv[0] = strdup("phi2");
    size_t start = 0;
    for (int a = 1; a < argc; a++) {
        size_t end = start;
        while (end < size && data[end] != 0) end++;
        argv[a] = malloc(end - start + 1);
        memcpy(argv[a], data + start, end - start);
        argv[a][end - start] = '\0';
        start = end + 1;
    }

    if (!setjmp(g_on_error)) {
        Options o = parse_args(argc, argv);
        check_options(&o, argc, argv);
    }

    // parse_ids on the last argument, against a vocabulary of 1 .. 65536 ids.
    static volatile int vocab;  // volatile: read after a longjmp
    vocab = 1 + (int)(size * 2654435761u % 65536);
    g_tracking = 1;
    if (!setjmp(g_on_error)) {
        int n = -1;
        int *ids = parse_ids(argv[argc - 1], vocab, &n);
        g_tracking = 0;
        if (n < 1) finding("parse_ids returned no ids");
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= vocab) finding("parse_ids returned an id out of range");
        free(ids);
    } else {
        g_tracking = 0;
        for (int i = 0; i < 8; i++)
            if (g_live[i]) {
                free((void *)g_live[i]);
                g_live[i] = NULL;
            }
    }
    g_tracking = 0;
    for (int i = 0; i < 8; i++) g_live[i] = NULL;

    for (int a = 0; a < argc; a++) free(argv[a]);
    free(argv);
    return 0;
}
