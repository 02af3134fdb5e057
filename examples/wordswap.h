/* The word-swap attack on text, as the paper's language-model robustness test runs it on
   WikiText-103's held-out text: in each line, a share of the words (at least one) that are
   not stopwords is replaced by the fixed token "AAA". A word is a run of letters and digits,
   with ' - _ * @ allowed inside it; stopwords are English function words, compared case by
   case as written (so "The" can be swapped, "the" not). The training text stays clean. */
#ifndef ACMOE_EXAMPLES_WORDSWAP_H
#define ACMOE_EXAMPLES_WORDSWAP_H

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#define WORDSWAP_TOKEN "AAA"
#define WORDSWAP_MAX_WORDS 4096 /* per line; words beyond it are never swapped */

/* Articles, pronouns, auxiliaries, prepositions, conjunctions and the other function words
   of English, lower case, sorted for bsearch. */
static const char *const wordswap_stopwords[] = {
    "a",       "about",  "above",   "after",   "again",   "against", "all",     "am",      "an",     "and",
    "any",     "are",    "aren't",  "as",      "at",      "be",      "because", "been",    "before", "being",
    "below",   "between", "both",   "but",     "by",      "can",     "could",   "couldn't", "did",   "didn't",
    "do",      "does",   "doesn't", "doing",   "don't",   "down",    "during",  "each",    "few",    "for",
    "from",    "further", "had",    "hadn't",  "has",     "hasn't",  "have",    "haven't", "having", "he",
    "her",     "here",   "hers",    "herself", "him",     "himself", "his",     "how",     "i",      "if",
    "in",      "into",   "is",      "isn't",   "it",      "it's",    "its",     "itself",  "just",   "me",
    "might",   "more",   "most",    "must",    "mustn't", "my",      "myself",  "no",      "nor",    "not",
    "now",     "of",     "off",     "on",      "once",    "only",    "or",      "other",   "our",    "ours",
    "ourselves", "out",  "over",    "own",     "same",    "shall",   "she",     "should",  "shouldn't", "so",
    "some",    "such",   "than",    "that",    "that's",  "the",     "their",   "theirs",  "them",   "themselves",
    "then",    "there",  "these",   "they",    "this",    "those",   "through", "to",      "too",    "under",
    "until",   "up",     "upon",    "us",      "very",    "was",     "wasn't",  "we",      "were",   "weren't",
    "what",    "when",   "where",   "which",   "while",   "who",     "whom",    "why",     "will",   "with",
    "won't",   "would",  "wouldn't", "you",    "your",    "yours",   "yourself", "yourselves"};

static int wordswap_compare(const void *key, const void *entry) {
    return strcmp((const char *)key, *(const char *const *)entry);
}

/* Whether the word [start, start + length) is a stopword (as written). */
static int wordswap_is_stopword(const unsigned char *start, size_t length) {
    char word[32];
    if (length >= sizeof word) return 0;
    memcpy(word, start, length);
    word[length] = '\0';
    return bsearch(word, wordswap_stopwords, sizeof wordswap_stopwords / sizeof wordswap_stopwords[0],
                   sizeof wordswap_stopwords[0], wordswap_compare) != NULL;
}

static int wordswap_inner(unsigned char c) { return c == '\'' || c == '-' || c == '_' || c == '*' || c == '@'; }

/* The end of the word that starts at p (an alphanumeric byte), before end. */
static const unsigned char *wordswap_word_end(const unsigned char *p, const unsigned char *end) {
    while (p < end && (isalnum(*p) || (wordswap_inner(*p) && p + 1 < end && isalnum(p[1])))) p++;
    return p;
}

typedef struct wordswap_line {
    size_t start[WORDSWAP_MAX_WORDS], length[WORDSWAP_MAX_WORDS]; /* the swappable words */
    int swappable, words;
    unsigned char swap[WORDSWAP_MAX_WORDS];
} wordswap_line;

/* The words of the line [p, end) into line: all counted, the non-stopwords kept. */
static void wordswap_scan(const unsigned char *p, const unsigned char *end, const unsigned char *base, wordswap_line *line) {
    line->swappable = line->words = 0;
    while (p < end) {
        const unsigned char *word_end;
        if (!isalnum(*p)) {
            p++;
            continue;
        }
        word_end = wordswap_word_end(p, end);
        line->words++;
        if (line->swappable < WORDSWAP_MAX_WORDS && !wordswap_is_stopword(p, (size_t)(word_end - p))) {
            line->start[line->swappable] = (size_t)(p - base), line->length[line->swappable] = (size_t)(word_end - p);
            line->swap[line->swappable++] = 0;
        }
        p = word_end;
    }
}

/* Marks max(share x words, 1) of the swappable words, drawn without replacement. */
static void wordswap_choose(wordswap_line *line, double share, acmoe_rng *rng) {
    static int order[WORDSWAP_MAX_WORDS];
    int want = (int)(share * line->words), i;
    if (want < 1) want = 1;
    if (want > line->swappable) want = line->swappable;
    for (i = 0; i < line->swappable; i++) order[i] = i;
    for (i = 0; i < want; i++) {
        const int j = i + (int)acmoe_rng_below(rng, (uint32_t)(line->swappable - i)), pick = order[j];
        order[j] = order[i], order[i] = pick;
        line->swap[pick] = 1;
    }
}

/* The text with the attack applied, line by line, with words drawn from a generator seeded
   by seed (the same text and seed give the same attack); *out_size bytes, or NULL when
   memory runs out. */
static unsigned char *wordswap_text(const unsigned char *text, size_t size, double share, uint64_t seed,
                                    size_t *out_size) {
    static wordswap_line line;
    const unsigned char *p = text, *end = text + size;
    unsigned char *out = (unsigned char *)malloc(size * 2 + 8), *o = out; /* "AAA" is at most twice "a b" */
    acmoe_rng rng;
    if (!out) return NULL;
    acmoe_rng_seed(&rng, seed);
    while (p < end) {
        const unsigned char *line_end = (const unsigned char *)memchr(p, '\n', (size_t)(end - p));
        size_t copied;
        int w;
        line_end = line_end ? line_end + 1 : end;
        wordswap_scan(p, line_end, text, &line);
        if (line.swappable) wordswap_choose(&line, share, &rng);
        copied = (size_t)(p - text);
        for (w = 0; w < line.swappable; w++) {
            if (!line.swap[w]) continue;
            memcpy(o, text + copied, line.start[w] - copied), o += line.start[w] - copied;
            memcpy(o, WORDSWAP_TOKEN, sizeof WORDSWAP_TOKEN - 1), o += sizeof WORDSWAP_TOKEN - 1;
            copied = line.start[w] + line.length[w];
        }
        memcpy(o, text + copied, (size_t)(line_end - text) - copied), o += (size_t)(line_end - text) - copied;
        p = line_end;
    }
    *out_size = (size_t)(o - out);
    return out;
}

#endif
