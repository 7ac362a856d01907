#!/usr/bin/perl

# Errors that say a key's money is spent (Anthropic's spend cap, its own
# usage limits, no credit; OpenAI's insufficient_quota and spend limits)
# take the key's org out of rotation until its billing month turns, and
# the request goes to another key.  An ordinary 429 only cools the org;
# a 529 is the provider's, and cools nothing.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use POSIX qw(strftime);
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . int(rand(1e9)) } qw(a b c d);
my $TOKEN = 'gw-spent-' . int(rand(1e9));

my $mock = $t->start_mock(port => 1, log => 1);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org oa rpm=100;
        ratepool_org ob rpm=100;
        ratepool_org oc rpm=100;
        ratepool_org od rpm=100;
        ratepool_key a org=oa server=127.0.0.1:%%PORT_1%% key=$KEY{a};
        ratepool_key b org=ob server=127.0.0.1:%%PORT_1%% key=$KEY{b};
        ratepool_key c org=oc server=127.0.0.1:%%PORT_1%% key=$KEY{c};
        ratepool_key d org=od server=127.0.0.1:%%PORT_1%% key=$KEY{d};
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

my $next_month = do {
    my @now = gmtime;
    my ($y, $m) = ($now[5] + 1900, $now[4] + 2);
    ($y, $m) = ($y + 1, 1) if $m > 12;
    sprintf '%04d-%02d-01T00:00:00Z', $y, $m;
};

sub keys_state {
    my $s = $t->status;
    return { map { $_->{name} => $_->{state} } @{ $s->{pools}[0]{keys} } };
}

# every key answers 529 once: the provider is overloaded, nothing cools
# (key d answers in OpenAI's words below: what is said counts, not who)
$mock->script($KEY{$_}, [ { status => 529 } ]) for qw(a b c d);
my $r = $t->messages(token => $TOKEN);
is($r->{status}, 529, 'a 529 passes through as the provider sent it');
$mock->reset;
is_deeply([ sort values %{ keys_state() } ], [ ('ok') x 4 ],
    'and no key cools down for it');

# Anthropic's spend cap: a 429 with no retry-after
my $cap = { type => 'error', request_id => 'req_cap',
            error => { type => 'rate_limit_error',
                       message => 'You have reached your API usage limits.',
                       details => {
                           error_code => 'enforced_spend_limit_reached' } } };
$mock->script($KEY{a}, [ { status => 429, body => $cap } ], sticky => 1);
$mock->script($KEY{b}, [ { status => 400, body => {
    type => 'error', error => { type => 'invalid_request_error',
        message => 'You have reached your specified API usage limits. '
                 . 'You will regain access on 2026-12-01 at 00:00 UTC.' } } } ],
    sticky => 1);
$mock->script($KEY{d}, [ { status => 429, body => { error => {
    message => 'You exceeded your current quota, please check your plan '
             . 'and billing details.',
    type => 'insufficient_quota', param => undef,
    code => 'insufficient_quota' } } } ], sticky => 1);

my @codes = map { $t->messages(token => $TOKEN)->{status} } 1 .. 8;
is(join(',', @codes), join(',', (200) x 8),
    'spend caps, own usage limits and quota are hidden: every request is '
    . 'served');

my $state = keys_state();
is($state->{$_}, 'spent', "key $_ is out of money") for qw(a b d);
is($state->{c}, 'ok', 'key c is fine');

my %name = map { ($KEY{$_} => $_) } keys %KEY;
my %tried;
$tried{ $name{ $_->{headers}{'x-api-key'}
               // $_->{headers}{authorization} // '' } // '?' }++
    for @{ $mock->log };
is($tried{a} + $tried{b} + $tried{d}, 3,
    'each spent key was tried once, then left alone');

my $orgs = Ratepool::Test::by_name($t->status->{pools}[0]{orgs});
is(strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $orgs->{oa}{spent_until}),
   $next_month, 'until the first of next month, 00:00 UTC');
is($orgs->{oc}{spent_until}, 0, 'an org with money has none');

like($t->error_log, qr/key "a" got 429 saying its org's money is spent .* org "oa" is out of rotation until \Q$next_month\E/,
    'the error log says which key and org, and until when');

# an ordinary 429 cools, and does not take the org out
$mock->script($KEY{c}, [ { status => 429, retry_after => 1 } ]);
$r = $t->messages(token => $TOKEN);
is($r->{status}, 429, 'an ordinary 429 on the last key with money');
ok(defined $r->{headers}{'retry-after'}, 'goes out with a retry-after');
is(keys_state()->{c}, 'cooling', 'its key cools down, it is not spent');

# the last key spends its money too, once it has cooled down (and its
# emptied request bucket has one again)
sleep 2.5;
$mock->reset;
$mock->script($KEY{c}, [ { status => 429, body => $cap } ]);
$r = $t->messages(token => $TOKEN);
my $err = eval { decode_json($r->{body}) } || {};
is($r->{status}, 429, 'the last key\'s spend cap reaches the client');
is($err->{error}{details}{error_code}, 'enforced_spend_limit_reached',
    'as the provider sent it');
ok(!defined $r->{headers}{'retry-after'}, 'with no retry-after');

$r = $t->messages(token => $TOKEN);
$err = eval { decode_json($r->{body}) } || {};
is($r->{status}, 429, 'with every org spent the gateway answers itself');
is($err->{error}{details}{error_code}, 'enforced_spend_limit_reached',
    'the way a provider tells of its spend cap');
like($err->{error}{message}, qr/resets at \Q$next_month\E/, 'saying when');
ok(!defined $r->{headers}{'retry-after'}, 'no retry-after');
is($r->{headers}{'x-should-retry'}, 'false', 'and x-should-retry: false');
is(scalar @{ $mock->log }, 1, 'without asking the provider');

done_testing;
