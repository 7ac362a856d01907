#!/usr/bin/perl

# A provider's absurd usage numbers are bounded: an 18-digit token count
# is counted as 100 million tokens and logged, a budget never wraps round
# to unspent, a bucket owes at most a minute for one answer, and what is
# sent to Redis stays a number Redis can keep.  Real Redis, real nginx.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep);

use Ratepool::Test;

my $t = Ratepool::Test->new;
my $redis = $t->start_redis;

my $KEY = 'sk-ant-mock-u1-' . Ratepool::Test::random_hex(8);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(liar budget other);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { $KEY => { org => 'org-u', name => 'u1' } },
});

$t->write_config(<<"EOF2");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port }
                  redis_timeout=100ms redis_fail=closed;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-u rpm=100000 itpm=1000000000 otpm=1000000000;
        ratepool_key u1 org=org-u server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace liar;
    ratepool_workspace budget daily_tokens=100000000;
    ratepool_workspace other;
    ratepool_client liar ${\ $t->token_hash($TOKEN{liar})};
    ratepool_client budget ${\ $t->token_hash($TOKEN{budget})};
    ratepool_client other ${\ $t->token_hash($TOKEN{other})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            access_log off;
            ratepool_status;
        }
    }
}
EOF2

$t->run;

ok(Ratepool::Test::redis_connected($t), 'the gateway uses Redis');

my $absurd = encode_json({ input_tokens => 999999999999999999,
                           output_tokens => 999999999999999999 });

sub ask {
    my ($who, @headers) = @_;
    return $t->messages(token => $TOKEN{$who}, headers => [ @headers ]);
}

is(ask('liar', 'x-mock-usage' => $absurd)->{status}, 200,
   'an answer that claims 10^18 tokens reaches its client');
like($t->error_log, qr/key "u1" answered a usage of more than 100000000 /,
     'the log says what was not believed');

sleep 0.3;      # what Redis is told goes in batches

is(ask('liar')->{status}, 200,
   'the next request of that workspace is decided as usual, not 503');
like($redis->cli('HGET', 'ratepool:{llm}:o:org-u', 'i'), qr/^\d+$/,
     'Redis keeps a number it can count on');

my $ws = Ratepool::Test::by_name($t->status->{workspaces});
cmp_ok($ws->{liar}{tokens}{input}, '<=', 100000000 + 1000,
       'the workspace is charged 100 million input tokens, no more');

# a budget never wraps: ten answers of 10^18 would have wrapped it

is(ask('budget', 'x-mock-usage' => $absurd)->{status}, 200,
   'a workspace with a daily budget is answered');
is(ask('budget')->{status}, 429, 'and is over its budget after it');

is(ask('other')->{status}, 200, 'other workspaces go on');

$t->check_log;

done_testing;
