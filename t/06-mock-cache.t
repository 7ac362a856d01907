#!/usr/bin/perl

# The mock provider's prompt caches ("prompt_cache": true), talked to
# directly: per org, prefixes up to cache_control breakpoints, lookback,
# the minimum size, TTLs, usage that adds up, reads free against itpm.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Conversation;
use Ratepool::Test;

my $t = Ratepool::Test->new(module => 0);

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(4) }
          qw(a1 a2 b1 c1 d1 r1 s1 o1);
my %ORG_OF = (a1 => 'org-a', a2 => 'org-a', b1 => 'org-b', c1 => 'org-c',
              d1 => 'org-d', r1 => 'org-r', s1 => 'org-s', o1 => 'org-o');
my %KEYS = map { ($KEY{$_} => { org => $ORG_OF{$_}, name => $_ }) }
           keys %KEY;

my $mock = $t->start_mock(log => 1,
    config => { keys => \%KEYS, prompt_cache => JSON::PP::true });

my $JSON = JSON::PP->new->utf8->canonical;
my $EPHEMERAL = { type => 'ephemeral' };

# ASCII filler of exactly $bytes bytes, different for each $seed
sub filler { Ratepool::Conversation::filler(@_) }

sub text_block {
    my ($bytes, $seed, %extra) = @_;
    return { type => 'text', text => filler($bytes, $seed), %extra };
}

# Blocks' size in tokens as the mock counts it: their JSON without
# cache_control, a token per 4 bytes
sub tokens_of {
    my $bytes = 0;
    for (@_) {
        my %block = %$_;
        delete $block{cache_control};
        $bytes += length $JSON->encode(\%block);
    }
    return $bytes / 4;
}

# Sends a body (a hash, encoded here so that its length is known) with
# the key; returns the response, its usage and the body's token estimate.
sub send_body {
    my ($key, $body, %opt) = @_;

    my $bytes = $JSON->encode({ model => 'claude-sonnet-4-6',
                                max_tokens => 64, %$body });
    my $r = $opt{openai}
        ? $t->http(port => $mock->port, method => 'POST',
                   path => '/v1/chat/completions',
                   headers => [ Authorization => "Bearer $KEY{$key}" ],
                   body => $bytes)
        : $t->messages(port => $mock->port, token => $KEY{$key},
                       body => $bytes);
    my $answer = eval { decode_json($r->{body}) } || {};

    return ($r, $answer->{usage} || {}, int(length($bytes) / 4));
}

sub total {
    my ($u) = @_;
    return $u->{input_tokens} + $u->{cache_creation_input_tokens}
         + $u->{cache_read_input_tokens};
}

# Claude Code's shape: tools, system blocks of which the last two carry
# cache_control, the conversation's last user block too.
my @TOOLS = map { { name => "tool_$_", description => filler(3000, "tool$_"),
                    input_schema => { type => 'object' } } } 1 .. 2;
my @SYSTEM = (text_block(200, 'sys0'),
              text_block(1500, 'sys1', cache_control => $EPHEMERAL),
              text_block(1500, 'sys2', cache_control => $EPHEMERAL));

sub conversation {
    my (@messages) = @_;
    return { tools => \@TOOLS, system => \@SYSTEM,
             messages => mark_last(@messages) };
}

# the messages with only the last block of the last one marked
sub mark_last {
    my (@messages) = @_;

    my @copy = map { { role => $_->{role},
                       content => [ map { {%$_} } @{ $_->{content} } ] } }
               @messages;
    $copy[-1]{content}[-1]{cache_control} = $EPHEMERAL;

    return \@copy;
}

sub user      { { role => 'user', content => [ @_ ] } }
sub assistant { { role => 'assistant', content => [ @_ ] } }

# --- a conversation's turns -------------------------------------------------

# what the tools and system alone come to, on an org of its own
my ($r, $sys) = send_body(c1 => { tools => \@TOOLS, system => \@SYSTEM,
    messages => [ { role => 'user', content => 'Hi' } ] });
is($r->{status}, 200, 'a request with cache_control is answered');
cmp_ok($sys->{cache_creation_input_tokens}, '>', 1024,
    'the tools and system blocks, over 1024 tokens, are written');
is($sys->{cache_read_input_tokens}, 0, 'and nothing is read on a cold org');

my @turn1 = (user(text_block(400, 'u1')));
my ($u1, $est1);
($r, $u1, $est1) = send_body(a1 => conversation(@turn1));

is($u1->{cache_read_input_tokens}, 0, 'the first turn reads nothing');
cmp_ok($u1->{cache_creation_input_tokens}, '>', $sys->{cache_creation_input_tokens},
    'it writes its prefix up to the last user block');
cmp_ok(abs($u1->{input_tokens} - ($est1 - tokens_of(@TOOLS, @SYSTEM,
                                        map { @{ $_->{content} } } @turn1))),
    '<=', 1, "uncached input is the body's JSON around the blocks");
is(total($u1), $est1, "the three counts add up to the body's estimate");

my @new2 = (assistant(text_block(800, 'a1')), user(text_block(1200, 'u2')));
my @turn2 = (@turn1, @new2);
my ($u2, $est2);
($r, $u2, $est2) = send_body(a1 => conversation(@turn2));

is($u2->{cache_read_input_tokens}, $u1->{cache_creation_input_tokens},
    'the second turn reads what the first wrote, its breakpoint moved on');
cmp_ok(abs($u2->{cache_creation_input_tokens}
           - tokens_of(map { @{ $_->{content} } } @new2)), '<=', 1,
    'and writes only the blocks the turn added');
is(total($u2), $est2, 'its counts add up to the estimate too');

my $whole2 = $u2->{cache_read_input_tokens}
           + $u2->{cache_creation_input_tokens};

my ($u, $est);
($r, $u) = send_body(b1 => conversation(@turn2));
is($u->{cache_read_input_tokens}, 0,
    "another org's key reads nothing: caches are per org");
is($u->{cache_creation_input_tokens}, $whole2, 'and writes the whole prefix');

($r, $u) = send_body(a2 => conversation(@turn2));
is($u->{cache_read_input_tokens}, $whole2,
    "another key of the same org reads the org's cache");
is($u->{cache_creation_input_tokens}, 0, 'and writes nothing');

# a turn of 22 blocks: the old breakpoint is beyond the 20-block lookback
my @many = map { text_block(100, "m$_") } 1 .. 11;
($r, $u) = send_body(a1 => conversation(@turn2, assistant(@many[0 .. 4]),
                                        user(@many[5 .. 10]),
                                        assistant(text_block(100, 'x')),
                                        user(text_block(100, 'y'),
                                             text_block(100, 'z'),
                                             text_block(100, 'w'),
                                             text_block(100, 'v'),
                                             text_block(100, 'q'),
                                             text_block(100, 'p'),
                                             text_block(100, 'o'),
                                             text_block(100, 'n'),
                                             text_block(100, 'l'),
                                             text_block(100, 'k'))));
is($u->{cache_read_input_tokens}, $sys->{cache_creation_input_tokens},
    'past 20 new blocks the conversation misses; the system prefix is read');

# the same with a "bridge" breakpoint on its first new block
my @bridged = map { text_block(100, "b$_") } 1 .. 22;
$bridged[0]{cache_control} = $EPHEMERAL;
($r, $u) = send_body(a1 => conversation(@turn2, assistant(@bridged[0 .. 10]),
                                        user(@bridged[11 .. 21])));
is($u->{cache_read_input_tokens}, $whole2,
    'a bridge breakpoint within 20 blocks finds the conversation');

# --- breakpoints, sizes ------------------------------------------------------

my $plain = { tools => \@TOOLS, system => [ text_block(3000, 'top') ],
              messages => [ user(text_block(100, 'top-u')) ] };
my $u_top;
($r, $u_top) = send_body(d1 => { %$plain, cache_control => $EPHEMERAL });
cmp_ok($u_top->{cache_creation_input_tokens}, '>', 2000,
    'a top-level cache_control writes up to the last block');
($r, $u) = send_body(d1 => { %$plain, cache_control => $EPHEMERAL });
is($u->{cache_read_input_tokens}, $u_top->{cache_creation_input_tokens},
    'and the same request then reads it');
($r, $u) = send_body(d1 => $plain);
is($u->{cache_read_input_tokens} + $u->{cache_creation_input_tokens}, 0,
    'without cache_control nothing is read or written');

sub marked { map { text_block(300, "mk$_", cache_control => $EPHEMERAL) } @_ }

($r, $u) = send_body(d1 => { system => [ text_block(5000, 'mk'), marked(1 .. 3) ],
                             messages => [ user(marked(4)) ] });
is($r->{status}, 200, 'four breakpoints are accepted');

($r) = send_body(d1 => { system => [ marked(1 .. 4) ],
                         messages => [ user(marked(5)) ] });
is($r->{status}, 400, 'five breakpoints are refused');
like($r->{body}, qr/"invalid_request_error".*maximum of 4 blocks/,
    'with invalid_request_error, as the API does');

for my $n (1 .. 2) {
    ($r, $u) = send_body(d1 => { system => [ text_block(3900, 'small',
                                             cache_control => $EPHEMERAL) ],
                                 messages => [ user(text_block(10, 's')) ] });
}
is($u->{cache_read_input_tokens} + $u->{cache_creation_input_tokens}, 0,
    'a prefix just under 1024 tokens is neither written nor read');
for my $n (1 .. 2) {
    ($r, $u) = send_body(d1 => { system => [ text_block(4200, 'big',
                                             cache_control => $EPHEMERAL) ],
                                 messages => [ user(text_block(10, 's')) ] });
}
cmp_ok($u->{cache_read_input_tokens}, '>', 1024,
    'one just over is read the second time');

# --- the request log -----------------------------------------------------------

my @log = grep { ($_->{key_name} // '') eq 'a1' } @{ $mock->log };
is_deeply($log[1]{usage}, { %$u2 },
    'the log records the usage a turn was answered with');

# --- itpm ---------------------------------------------------------------------

$mock->set_config({ keys => \%KEYS, prompt_cache => JSON::PP::true,
    orgs => { 'org-r' => { itpm => 3000 },
              'org-s' => { itpm => 3000,
                           itpm_cache_reads => JSON::PP::true } } });

my @itpm = (user(text_block(9000, 'itpm')));
my $first = { system => [ text_block(200, 'itpm-sys') ],
              messages => mark_last(@itpm) };
my $second = { system => [ text_block(200, 'itpm-sys') ],
               messages => mark_last(@itpm, assistant(text_block(500, 'ia')),
                                     user(text_block(500, 'iu'))) };

($r) = send_body(r1 => $first);
is($r->{status}, 200, 'a first turn of about 2,300 tokens fits in itpm 3000');
my $left = $r->{headers}{'anthropic-ratelimit-input-tokens-remaining'};
($r, $u) = send_body(r1 => $second);
cmp_ok(total($u), '>', $left + 60,
    'the second turn is larger than what is left of itpm');
is($r->{status}, 200, 'yet it is admitted: cache reads are free');
cmp_ok($left - $r->{headers}{'anthropic-ratelimit-input-tokens-remaining'},
    '<=', $u->{input_tokens} + $u->{cache_creation_input_tokens},
    'itpm is charged the written and uncached tokens only');

($r) = send_body(s1 => $first);
is($r->{status}, 200, 'on an org counting cache reads the first turn fits');
($r) = send_body(s1 => $second);
is($r->{status}, 429, 'but the second does not');

# --- OpenAI -------------------------------------------------------------------

$mock->set_config({ keys => \%KEYS, prompt_cache => JSON::PP::true,
                    orgs => { 'org-o' => { tpm => 6000 } } });

my @chat = ({ role => 'system', content => filler(6000, 'oa') },
            { role => 'user', content => 'first' });
my ($o1) = send_body(o1 => { messages => \@chat }, openai => 1);
my $tpm_left = $o1->{headers}{'x-ratelimit-remaining-tokens'};
my ($o2, $ou, $oest) = send_body(o1 => { messages => [ @chat,
    { role => 'assistant', content => 'answer' },
    { role => 'user', content => 'second' } ] }, openai => 1);

cmp_ok($ou->{prompt_tokens_details}{cached_tokens}, '>', 1024,
    "OpenAI's dialect reads the previous prompt from the cache");
is($ou->{prompt_tokens}, $oest, 'prompt_tokens counts all of the prompt');
cmp_ok($tpm_left - $o2->{headers}{'x-ratelimit-remaining-tokens'}, '>=',
    $ou->{prompt_tokens} - 50, 'and cached tokens count toward tpm');

# --- TTL ----------------------------------------------------------------------

# time is what is tested here: the waits are sleeps
$mock->set_config({ keys => \%KEYS, prompt_cache => JSON::PP::true,
                    cache_ttl_s => 3, cache_ttl_1h_s => 60 });

# later turns read the first one's prefix by lookback, not as a
# breakpoint of their own: only the read can keep it alive
my @base = (user(text_block(5000, 'ttl5m')));
my $short = { messages => mark_last(@base) };
sub later_turn {
    my ($n) = @_;
    return { messages => mark_last(@base, assistant(text_block(100, "r$n")),
                                   user(text_block(100, "q$n"))) };
}
my $long = { messages => [ user(text_block(5000, 'ttl1h',
                cache_control => { type => 'ephemeral', ttl => '1h' })) ] };

my $u_short;
($r, $u_short) = send_body(a1 => $short);
send_body(a1 => $long);
my $written = time;

sleep 2;
($r, $u) = send_body(a1 => later_turn(1));
is($u->{cache_read_input_tokens}, $u_short->{cache_creation_input_tokens},
    'a prefix is read within its TTL');
sleep 2;
($r, $u) = send_body(a1 => later_turn(2));
is($u->{cache_read_input_tokens}, $u_short->{cache_creation_input_tokens},
    sprintf('and again %.1f s after it was written: a read refreshes it',
            time - $written));
sleep 3.5;
($r, $u) = send_body(a1 => $short);
is($u->{cache_read_input_tokens}, 0, 'once the TTL has run out it is gone');
cmp_ok($u->{cache_creation_input_tokens}, '>', 0, 'and written anew');
($r, $u) = send_body(a1 => $long);
cmp_ok($u->{cache_read_input_tokens}, '>', 0, 'a "ttl":"1h" prefix lives on');

# --- off by default ----------------------------------------------------------

$mock->set_config({ keys => \%KEYS });
send_body(a1 => conversation(@turn1));
($r, $u, $est) = send_body(a1 => conversation(@turn1));
is($u->{cache_read_input_tokens} + $u->{cache_creation_input_tokens}, 0,
    'without prompt_cache nothing is cached');
is($u->{input_tokens}, $est, 'and all input is uncached');

done_testing;
