/* Router patterns: one letter per layer (acmoe_router_name says which router), stages of a
   Swin-style backbone split by '|'. moe_pattern_valid and moe_split_patterns check them
   before any work; pattern_label names the routers for people ("ggc (SMoE, SMoE, AC)"). */
#ifndef ACMOE_EXAMPLES_PATTERNS_H
#define ACMOE_EXAMPLES_PATTERNS_H

#include <stdio.h>
#include <string.h>

#include "../acmoe.h"

#define MOE_PATTERN_MAX 63 /* router letters (layers) the library takes */
#define PATTERN_LABEL_MAX 1280 /* 63 layers of the longest names */

/* Whether the letter's router takes its input from the AC weights: such a layer needs an
   MoE layer before it in its stage, whose choices are its clusters. */
static inline int moe_letter_is_ac(char letter) {
    acmoe_moe_desc desc;
    memset(&desc, 0, sizeof desc);
    return acmoe_moe_router_preset(&desc, letter) == ACMOE_OK && desc.router_input == ACMOE_INPUT_AC;
}

/* "g s o ...": every router letter, for messages. */
static inline const char *moe_router_letters(void) {
    static char letters[64];
    int c, used = 0;
    if (letters[0]) return letters;
    for (c = 'a'; c <= 'z'; c++)
        if (acmoe_router_name((char)c)) used += snprintf(letters + used, sizeof letters - (size_t)used, "%s%c", used ? " " : "", c);
    return letters;
}

/* Whether a pattern is 1 to 63 router letters, or stages of them split by '|', whose AC
   layers each follow an MoE layer of their stage; else why not. */
static inline int moe_pattern_valid(const char *pattern, size_t length, char *why, size_t cap) {
    size_t i;
    int seen_moe = 0;
    if (length < 1 || length > MOE_PATTERN_MAX) {
        snprintf(why, cap, "a pattern is 1 to %d router letters, not %lu", MOE_PATTERN_MAX, (unsigned long)length);
        return 0;
    }
    for (i = 0; i < length; i++) {
        const char letter = pattern[i];
        if (letter == '|') { /* a new stage: labels start afresh */
            if (i == 0 || i + 1 == length || pattern[i - 1] == '|') {
                snprintf(why, cap, "pattern '%.*s': an empty stage", (int)length, pattern);
                return 0;
            }
            seen_moe = 0;
            continue;
        }
        if (!acmoe_router_name(letter)) {
            snprintf(why, cap, "pattern '%.*s': '%c' is no router (%s)", (int)length, pattern, letter ? letter : '?',
                     moe_router_letters());
            return 0;
        }
        if (moe_letter_is_ac(letter) && !seen_moe) {
            snprintf(why, cap, "pattern '%.*s': an AC layer ('%c') needs an MoE layer before it", (int)length, pattern,
                     letter);
            return 0;
        }
        seen_moe |= letter != 'f';
    }
    return 1;
}

/* Splits a comma-separated list of at most max patterns into out. The count, or 0 with the
   reason in why. */
static inline int moe_split_patterns(const char *list, char out[][MOE_PATTERN_MAX + 1], int max, char *why, size_t cap) {
    const char *p = list;
    int n = 0;
    for (;;) {
        const size_t length = strcspn(p, ",");
        if (n == max) {
            snprintf(why, cap, "at most %d patterns, not more", max);
            return 0;
        }
        if (!moe_pattern_valid(p, length, why, cap)) return 0;
        memcpy(out[n], p, length);
        out[n++][length] = '\0';
        if (!p[length]) return n;
        p += length + 1;
    }
}

/* Appends text to out (cap bytes, NUL-terminated), as much as fits. */
static inline void text_append(char *out, size_t cap, const char *text) {
    size_t used = strlen(out);
    for (; *text && used + 1 < cap; text++) out[used++] = *text;
    out[used] = '\0';
}

/* The routers of a pattern, one per layer: "SMoE, SMoE, AC", stages split by " | ". */
static inline void pattern_routers(const char *pattern, char *out, size_t cap) {
    const char *p;
    out[0] = '\0';
    for (p = pattern; *p; p++) {
        const char *name = acmoe_router_name(*p);
        if (*p == '|') text_append(out, cap, " | ");
        else if (p != pattern && p[-1] != '|') text_append(out, cap, ", ");
        if (*p != '|') text_append(out, cap, name ? name : "?");
    }
}

/* "ggc (SMoE, SMoE, AC)": the pattern and its routers, as outputs name a model. */
static inline void pattern_label(const char *pattern, char *out, size_t cap) {
    out[0] = '\0';
    text_append(out, cap, pattern);
    text_append(out, cap, " (");
    pattern_routers(pattern, out + strlen(out), cap - strlen(out));
    text_append(out, cap, ")");
}

#endif
