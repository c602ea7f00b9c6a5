/* finding.h -- how a fuzz harness reports a broken property: say what went wrong, then
 * abort() so libFuzzer saves the input. On stdout, flushed, because run.sh hides stderr
 * (-close_fd_mask=2). Include once per harness. */
#ifndef PHI2_FUZZ_FINDING_H
#define PHI2_FUZZ_FINDING_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static void finding(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void finding(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    abort();
}

#endif
