#!/usr/bin/perl

# A workspace's daily budget holds when its requests come at once: each
# request reserves against the budget all it may use (its whole prompt and
# its output cap) while it is in flight, so 30 requests sent together
# overrun a budget by no more than one request uses.  Near the budget the
# others get a 429 that says so (or, with ratepool_wait, wait for the ones
# in flight), then the budget's own answer once it is spent.  Before, all
# 30 went out and the workspace used several times its budget.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-d1-' . Ratepool::Test::random_hex(8);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(burst queue);

my $mock = $t->start_mock(port => 1, config => {
    keys => { $KEY => { org => 'org-d', name => 'd1' } },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-d rpm=10000 itpm=10000000 otpm=1000000;
        ratepool_key d1 org=org-d server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace burst daily_tokens=5000;
    ratepool_workspace queue daily_tokens=5000;
    ratepool_client burst ${\ $t->token_hash($TOKEN{burst})};
    ratepool_client queue ${\ $t->token_hash($TOKEN{queue})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /wait/ {
            rewrite ^/wait(/.*)\$ \$1 break;
            ratepool_pass http://claude;
            ratepool_wait 10s;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

# each request uses about 800 tokens: a 2 KB prompt (512 input tokens at
# the mock's 4 bytes a token) and all of its 300 output tokens
my $body = { model => 'claude-sonnet-4-6', max_tokens => 300,
             messages => [ { role => 'user', content => 'x' x 2000 } ] };
my @headers = ('x-mock-delay-ms' => 400,
               'x-mock-usage' => '{"output_tokens":300}');

sub workspace { Ratepool::Test::by_name($t->status->{workspaces})->{$_[0]} }

for my $case ([ burst => '/v1/messages', 'at once' ],
              [ queue => '/wait/v1/messages', 'at once, with ratepool_wait' ])
{
    my ($ws, $path, $how) = @$case;

    my $seen = @{ $mock->log };
    my $answers = $t->parallel(30, sub {
        my $r = $t->messages(token => $TOKEN{$ws}, path => $path,
                             body => $body, headers => \@headers);
        my $err = eval { decode_json($r->{body}) } || {};
        return [ $r->{status}, $err->{error}{message} // '' ];
    });

    my @sent = @{ $mock->log }[ $seen .. $#{ $mock->log } ];
    my $most = 0;
    for (@sent) {
        my $u = $_->{usage} || {};
        my $used = ($u->{input_tokens} // 0) + ($u->{output_tokens} // 0);
        $most = $used if $used > $most;
    }

    my $w = workspace($ws);
    my $ok = grep { $_->[0] == 200 } @$answers;

    ok($w->{tokens_today} <= 5000 + $most,
        "30 requests $how: the workspace used $w->{tokens_today} tokens "
        . "of its 5000, overrunning it by one request ($most) at most");
    ok($w->{tokens_today} >= 5000 - $most,
        "and close to all of it ($ok requests served)");
    is(scalar @sent, $ok, 'the provider had only the requests served');

    my @near = grep { $_->[0] == 429 && $_->[1] =~ /near its daily budget/ }
               @$answers;
    my @spent = grep { $_->[0] == 429 && $_->[1] =~ /used its daily budget/ }
                @$answers;
    is($ok + @near + @spent, 30,
        'the others were told the budget was near or spent ('
        . scalar(@near) . ' and ' . scalar(@spent) . ')');

    if ($ws eq 'burst') {
        ok(@near > 0, 'near it, while the others were in flight');

        # alone, a request may take what is left, and overrun by itself
        my $r = $t->messages(token => $TOKEN{$ws}, path => $path,
                             body => $body, headers => \@headers);
        is($r->{status}, 200, 'a request alone may use what is left');
        $r = $t->messages(token => $TOKEN{$ws}, path => $path,
                          body => $body, headers => \@headers);
        is($r->{status}, 429, 'then the budget is spent');
        like($r->{body}, qr/used its daily budget/, 'and says so');
        $w = workspace($ws);
        ok($w->{tokens_today} <= 5000 + $most,
            "still by one request at most ($w->{tokens_today})");

    } else {
        is(scalar @near, 0, 'none was refused while others were in flight: '
            . 'they waited for them');
        ok(@spent > 0, 'and were told once it was spent');
    }

    is($w->{budget_reserved_tokens}, 0, 'nothing is left reserved');
}

like($t->error_log, qr/workspace "burst" is too near its daily budget of 5000/,
    'the refusals near the budget are logged');

$t->stop;
$t->check_log;

done_testing;
